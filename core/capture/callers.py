"""Whose op is it: the model's computation, or framework code running around it.

A training step runs much more than the model: Lightning logs the loss (``detach``, ``clone``,
``to``), optimizers and gradient scalers update tensors, FSDP gathers and splits its parameter
shards, metrics libraries accumulate. None of that is what a person looking inside their model
wants to see, and it changes from step to step, so labels would shift with it. What decides is
where the call comes from: the first frame that is not plumbing, that is torch's own dispatch code
(the wrappers of ``torch.nn.functional``, ``torch.overrides``, ``Tensor`` methods written in
Python) or the standard library (``copy.deepcopy`` of a tensor). An op issued
from a framework package is not a layer; an op issued from anywhere else (the model, ``torch.nn``
modules, the user's loss) is.

The answer is cached per code object, so deciding costs a frame hop and a dict lookup or two per
op: it runs in the recorder's hot path.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from types import CodeType, FrameType
from typing import TypeAlias

__all__ = ["FRAMEWORK_PACKAGES", "CallerFilter", "FrameworkSpec", "caller_filter"]

FRAMEWORK_PACKAGES: tuple[str, ...] = (
    # training frameworks and their utilities
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "lightning_utilities",
    "accelerate",
    # transformers' Trainer, not its models
    "transformers.trainer",
    "transformers.trainer_callback",
    "transformers.trainer_pt_utils",
    "transformers.trainer_seq2seq",
    "transformers.trainer_utils",
    "transformers.integrations.integration_utils",  # its logging callbacks (not its attention)
    # torch's training machinery, not its layers
    "torch.optim",
    "torch.nn.utils.clip_grad",  # gradient clipping, by the trainer or by hand
    "torch.utils._foreach_utils",
    "torch.amp",
    "torch.cuda.amp",
    "torch.distributed",
    "torch.nn.parallel",
    "torch.utils.tensorboard",
    # metrics and loggers
    "torchmetrics",
    "tensorboard",
    "wandb",
    "lens_callbacks",
)
"""Packages (module-name prefixes) whose ops are not layers of a capture: add to or take from it
with ``framework=(*FRAMEWORK_PACKAGES, "mylib")``."""

# Torch's dispatch plumbing between the code that asked for an op and the op: skipped, like the
# standard library, when looking for the caller.
_DISPATCH_MODULES = frozenset({
    "torch.overrides",
    "torch.nn.functional",
    "torch.functional",
    "torch._tensor",
    "torch._jit_internal",
    "torch._ops",  # torch.ops.<namespace>.<op>(...) calls
    "torch.utils._device",
})

FrameworkSpec: TypeAlias = "Iterable[str] | Callable[[str], bool] | CallerFilter"
"""Package names (``"lightning"`` covers ``lightning.pytorch.core``), or a predicate that takes
a module name (``frame.f_globals["__name__"]``) and says whether its ops are framework ops (or a
:class:`CallerFilter` made from either)."""

_MODEL, _DISPATCH, _FRAMEWORK = 0, 1, 2


class CallerFilter:
    """Tells, from the frame that issued an op, whether framework code issued it.

    Args:
        framework: see :data:`FrameworkSpec`; an empty tuple makes every op a layer.

    Raises:
        TypeError: ``framework`` is neither package names nor a callable.
    """

    def __init__(self, framework: Iterable[str] | Callable[[str], bool] = FRAMEWORK_PACKAGES) -> None:
        if callable(framework):
            self._predicate: Callable[[str], bool] | None = framework
            self.packages: tuple[str, ...] | None = None
        else:
            self._predicate = None
            self.packages = _packages(framework)
            self._names = frozenset(self.packages)
            self._prefixes = tuple(f"{name}." for name in self.packages)
        self.everything = self.packages == ()  # nothing is framework: no frame need be read
        # id(code) -> (code, kind); the code object is kept to tell a reused id from its own.
        self._kinds: dict[int, tuple[CodeType, int]] = {}

    def __getstate__(self) -> dict[str, object]:
        # sent to other processes (ddp_spawn) without the cache: code objects do not pickle
        return {**self.__dict__, "_kinds": {}}

    def _is_framework_module(self, module: str) -> bool:
        if self._predicate is not None:
            return bool(self._predicate(module))
        return module in self._names or module.startswith(self._prefixes)

    def issued_by_framework(self, frame: FrameType | None) -> bool:
        """Whether the first frame from ``frame`` out that is not plumbing is framework code."""
        kinds = self._kinds
        while frame is not None:
            code = frame.f_code
            known = kinds.get(id(code))
            if known is None or known[0] is not code:
                known = kinds[id(code)] = (code, self._kind(frame))
            if known[1] != _DISPATCH:
                return known[1] == _FRAMEWORK
            frame = frame.f_back
        return False

    def _kind(self, frame: FrameType) -> int:
        module = frame.f_globals.get("__name__")
        if not isinstance(module, str):
            return _MODEL
        if module in _DISPATCH_MODULES or module.partition(".")[0] in sys.stdlib_module_names:
            return _DISPATCH  # plumbing: whoever called copy.deepcopy or functools asked for the op
        return _FRAMEWORK if self._is_framework_module(module) else _MODEL


def _packages(framework: object) -> tuple[str, ...]:
    if isinstance(framework, str):
        framework = (framework,)
    elif isinstance(framework, bytes) or not isinstance(framework, Iterable):
        raise TypeError(
            f"framework={framework!r}: use package names (e.g. (*lens_core.FRAMEWORK_PACKAGES, "
            "'mylib')), () to record every op, or a predicate on module names."
        )
    names = tuple(framework)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"framework holds {name!r}: package names are strings like 'lightning'.")
    return names


_SHARED: dict[tuple[str, ...], CallerFilter] = {FRAMEWORK_PACKAGES: CallerFilter()}


def caller_filter(framework: FrameworkSpec) -> CallerFilter:
    """The filter for ``framework``. Filters of package names are shared, so that their caches
    (and the recorder's table of code paths, kept per filter) last the process."""
    if isinstance(framework, CallerFilter):
        return framework
    if callable(framework):
        return CallerFilter(framework)
    packages = _packages(framework)
    shared = _SHARED.get(packages)
    if shared is None:
        shared = _SHARED[packages] = CallerFilter(packages)
    return shared
