"""When to capture: which steps, which stages."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from numbers import Integral
from typing import Literal, cast

__all__ = ["STAGES", "Schedule", "Stage"]

Stage = Literal["train", "validate", "test", "predict", "sanity_check"]
STAGES: tuple[Stage, ...] = ("train", "validate", "test", "predict", "sanity_check")


@dataclass(frozen=True)
class Schedule:
    """Decides whether the step a batch belongs to is captured.

    A step is captured when any of the given rules says so. With no rule at all, every 100th
    step is (0, 100, 200, ...).

    Args:
        every_n_steps: capture steps 0, n, 2n, ...
        steps: capture exactly these steps.
        when: ``when(step, previous_loss)`` returns True to capture; ``previous_loss`` is the
            last loss seen by the driver (a float, or None before the first).
        stages: the stages to capture in; ``"train"`` only by default.
    """

    every_n_steps: int | None = None
    steps: frozenset[int] | None = None
    when: Callable[[int, float | None], bool] | None = None
    stages: frozenset[str] = frozenset({"train"})

    @classmethod
    def build(
        cls,
        every_n_steps: int | None,
        steps: Iterable[int] | None,
        when: Callable[[int, float | None], bool] | None,
        stages: Iterable[str] | str,
    ) -> Schedule:
        """Validates user arguments (naming each one in errors) and builds the schedule."""
        every: object = every_n_steps  # checked as what it is, not as what it is typed
        if every is not None:
            if isinstance(every, bool) or not isinstance(every, Integral) or every < 1:
                raise ValueError(f"every_n_steps={every!r}: use an int >= 1, or None.")
            every_n_steps = operator.index(every)
        step_set = None
        if steps is not None:
            if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
                raise TypeError(f"steps={steps!r}: use a list of ints, e.g. steps=[0, 500, 1000].")
            given: list[object] = list(steps)
            bad = [s for s in given if isinstance(s, bool) or not isinstance(s, Integral) or s < 0]
            if bad:
                raise ValueError(f"steps contains {bad[0]!r}: steps are ints >= 0 (optimizer steps).")
            step_set = frozenset(operator.index(cast(Integral, s)) for s in given)
        if when is not None and not callable(when):
            raise TypeError(f"when={when!r}: use a callable when(step, previous_loss) -> bool.")
        named: object = [stages] if isinstance(stages, (str, bytes)) else stages
        if not isinstance(named, Iterable):
            raise TypeError(f"stages={stages!r}: use a stage or a list of them, from {list(STAGES)}.")
        given_stages: list[object] = list(named)
        unknown = [s for s in given_stages if not isinstance(s, str) or s not in STAGES]
        if unknown or not given_stages:
            raise ValueError(
                f"stages={given_stages!r}: choose from {list(STAGES)}"
                + (f" ({unknown[0]!r} is none of them)." if unknown else ".")
            )
        stage_set = frozenset(cast(list[str], given_stages))
        if every_n_steps is None and step_set is None and when is None:
            every_n_steps = 100
        return cls(every_n_steps, step_set, when, stage_set)

    def due(self, step: int, stage: str, previous_loss: float | None = None) -> bool:
        if stage not in self.stages:
            return False
        if self.every_n_steps is not None and step % self.every_n_steps == 0:
            return True
        if self.steps is not None and step in self.steps:
            return True
        return self.when is not None and bool(self.when(step, previous_loss))
