"""The gradients an optimizer update of a captured step used, read as the update happens.

A torch optimizer step post-hook sees ``.grad`` after clipping and unscaling, before
``zero_grad``: what the update used. Per-parameter hooks note the norm before clipping.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from lens_core.summaries import Summaries, TensorSummary, local_shard


def _norm(grad: torch.Tensor) -> torch.Tensor:
    """The L2 norm of a gradient, on its device (no sync), in float32 at least; of this rank's
    shard for a ``DTensor`` (a norm of the whole would communicate, see ``lens_core.summarize``)."""
    local = local_shard(grad)[0].detach()
    if local.layout != torch.strided:  # a sparse gradient (nn.Embedding(sparse=True))
        local = local.coalesce().values()
    wide = torch.promote_types(local.dtype, torch.float32)
    norm: torch.Tensor = torch.linalg.vector_norm(local, dtype=wide)
    return norm


def _total(norms: Iterable[torch.Tensor]) -> float:
    """The L2 norm of the concatenation of tensors whose norms are ``norms``."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for norm in norms:
        by_device.setdefault(norm.device, []).append(norm)
    squares = sum(float(torch.stack(group).double().square().sum()) for group in by_device.values())
    return math.sqrt(squares)


class StepUpdates:
    """The gradients the optimizer updates of one captured step used, read as they happen.

    The parameter gradients worth recording are the ones the update used: after clipping,
    unscaling and the all-reduce, which happen between the backward and the update, wherever
    the loop or the framework does them. So a torch optimizer step post-hook (process-wide, as
    long as the step is pending) reads the ``.grad`` of the model's parameters each optimizer
    holds, right after its update and before any ``zero_grad``. They are summarised there and
    then: a later backward or ``zero_grad`` may write to them in place. Several optimizers (a
    GAN's) each give the parameters they hold; a parameter updated twice (two optimizers
    sharing it, or one stepping twice) keeps the gradient of its last update.

    The norm before clipping comes from post-accumulate-grad hooks on the parameters: each
    notes the norm of a gradient when a backward has added to it, so the latest note of each
    is the gradient as the backward passes left it (accumulated, before the loop clips it).
    An integration that knows a better moment overrides it (:meth:`note_before_clip`).
    """

    def __init__(
        self, model: nn.Module, summaries: Summaries, scale: float, wanted: Callable[[], set[str] | None]
    ) -> None:
        self.names = {id(param): name for name, param in model.named_parameters()}
        self.params = [param for param in model.parameters() if param.requires_grad]
        self.summaries_of = summaries
        self.scale = scale  # of a grad scaler: the backward's gradients are that many times too large
        self.wanted = wanted  # the parameters worth summarising (None: all)
        self.summaries: dict[str, TensorSummary] = {}
        """Parameter name -> summary of ``.grad`` at its (last) update."""
        self.skipped: dict[str, str] = {}
        self.norms: dict[str, torch.Tensor] = {}
        """Parameter name -> norm of ``.grad`` at its (last) update."""
        self.accumulated: dict[str, torch.Tensor] = {}
        """Parameter name -> norm of ``.grad`` after the last backward that added to it."""
        self.before_clip: float | None = None  # overrides what accumulated says
        self.updates = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def install(self) -> None:
        try:
            self._handles.append(register_optimizer_step_post_hook(self._updated))
            for param in self.params:
                handle = param.register_post_accumulate_grad_hook(self._accumulated)  # type: ignore[no-untyped-call]
                self._handles.append(handle)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def _accumulated(self, param: torch.Tensor) -> None:
        name = self.names.get(id(param))
        if name is not None and param.grad is not None:
            with torch._C.DisableTorchFunction(), torch.no_grad():
                self.accumulated[name] = _norm(param.grad)

    def _updated(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        try:
            self._read(optimizer)
        except Exception as error:  # the update has happened: training must not fail on our account
            warnings.warn(
                f"lens_callbacks: the gradients of an optimizer step could not be read "
                f"({type(error).__name__}: {error}); training goes on.",
                RuntimeWarning,
                stacklevel=2,
            )

    def _read(self, optimizer: torch.optim.Optimizer) -> None:
        grads = {
            name: param.grad for group in optimizer.param_groups for param in group["params"]
            if (name := self.names.get(id(param))) is not None and param.grad is not None
        }
        if not grads:  # another model's optimizer
            return
        self.updates += 1
        wanted = self.wanted()
        summaries = self.summaries_of
        summaries.clear()
        with torch._C.DisableTorchFunction(), torch.no_grad():
            for name, grad in grads.items():
                self.norms[name] = _norm(grad)
                if wanted is None or name in wanted:
                    summaries.add(name, grad)
            found = summaries.result()  # now: the gradients may change after the update
        for name in grads:
            self.summaries.pop(name, None)
            self.skipped.pop(name, None)
        self.summaries.update((cast(str, name), summary) for name, summary in found.items())
        self.skipped.update((cast(str, name), why) for name, why in summaries.skipped.items())
        summaries.clear()

    def in_model_order(self, by_name: dict[str, TensorSummary]) -> dict[str, TensorSummary]:
        return {name: by_name[name] for name in self.names.values() if name in by_name}

    def note_before_clip(self, params: Iterable[torch.Tensor]) -> None:
        """Notes the norm of the gradients of ``params`` now, as the norm before clipping."""
        with torch._C.DisableTorchFunction(), torch.no_grad():
            norms = [_norm(p.grad) for p in params if id(p) in self.names and p.grad is not None]
        self.before_clip = _total(norms) if norms else None

    def norm(self) -> float | None:
        """Total norm of the gradients the updates used (None: no update)."""
        return _total(self.norms.values()) if self.norms else None

    def norm_before_clip(self) -> float | None:
        """Total norm of the same gradients before clipping (None: not known)."""
        if self.before_clip is not None:
            return self.before_clip
        if not self.norms or not all(name in self.accumulated for name in self.norms):
            return None  # no update, or a gradient no backward made (set by hand, FSDP's shards)
        return _total(self.accumulated[name] for name in self.norms) / self.scale
