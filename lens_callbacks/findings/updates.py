"""Measuring the update-to-weight ratio of the optimizer step that follows a capture.

The ratio ``|w_after - w_before| / |w_before|`` needs the weights on both sides of one
optimizer step. After :meth:`UpdateMeter.start`, process-wide optimizer step hooks
(``torch.optim.optimizer.register_optimizer_step_pre_hook`` and ``..._post_hook``) copy the
chosen weights right before the next ``optimizer.step()`` of an optimizer that holds them and
compare them right after it; then the copies are dropped and the hooks removed. So the memory
of one copy of those weights is held during one optimizer step after a captured step only, and
steps that are not captured pay nothing. A driver that records after ``optimizer.step()`` (a
plain loop with the step inside ``with lens.step(...)``, Lightning) measures the step after
the capture; one that records before it, the step of the capture.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

__all__ = ["UpdateMeter"]


class UpdateMeter:
    """Measures ``|update| / |weight|`` of chosen parameters over their next optimizer step.

    Only parameters of two or more dimensions (weight matrices, kernels) are measured: a bias
    or a norm's scale starts at 0 or 1, where the ratio says nothing about the learning rate.
    """

    def __init__(self) -> None:
        self._wanted: dict[int, tuple[str, nn.Parameter]] = {}  # id -> (name, parameter)
        self._before: dict[int, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self.ratios: dict[str, float] = {}
        """Parameter name -> ``|update| / |weight|``, once measured."""

    def start(self, model: nn.Module, names: Iterable[str]) -> None:
        """Measures the parameters ``names`` of ``model`` at their next optimizer step (what a
        previous start still waited for is dropped)."""
        self.stop()
        chosen = set(names)
        self._wanted = {id(param): (name, param) for name, param in model.named_parameters()
                        if name in chosen and param.requires_grad and param.dim() >= 2}
        if self._wanted:
            self._handles = [register_optimizer_step_pre_hook(self._copy),
                             register_optimizer_step_post_hook(self._measure)]

    @property
    def pending(self) -> bool:
        """Whether parameters chosen at :meth:`start` still wait for their optimizer step."""
        return bool(self._wanted)

    def take(self) -> dict[str, float]:
        """The ratios measured since the last take (removes the hooks once nothing is pending)."""
        if not self._wanted:
            self.stop()
        ratios, self.ratios = self.ratios, {}
        return ratios

    def stop(self) -> None:
        """Forgets what was chosen and copied and removes the hooks (safe to call twice)."""
        self._wanted, self._before = {}, {}
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def _held(self, optimizer: torch.optim.Optimizer) -> list[int]:
        return [id(param) for group in optimizer.param_groups for param in group["params"]
                if id(param) in self._wanted]

    def _copy(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for key in self._held(optimizer):
                self._before[key] = self._wanted[key][1].detach().clone()

    def _measure(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        keys = [key for key in self._held(optimizer) if key in self._before]
        if not keys:
            return
        with torch.no_grad():
            before = [self._before.pop(key) for key in keys]
            after = [self._wanted[key][1].detach() for key in keys]
            updates = torch._foreach_norm(torch._foreach_sub(after, before))
            weights = torch._foreach_norm(before)
            if len({u.device for u in updates}) == 1:  # one transfer for all
                ratios = (torch.stack(updates).double() / torch.stack(weights).double()).tolist()
            else:
                ratios = [(u.double() / w.double()).item() for u, w in zip(updates, weights, strict=True)]
        names = [self._wanted.pop(key)[0] for key in keys]
        measured = zip(names, ratios, strict=True)
        self.ratios.update((name, ratio) for name, ratio in measured if math.isfinite(ratio))
        # the hooks stay registered, doing nothing, until take() or stop(): torch is iterating
        # over them now, and removing one would change what it iterates over
