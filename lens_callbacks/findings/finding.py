"""What a rule reports: a :class:`Finding`, how bad it is, and the order findings are shown in."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["Finding", "Severity", "ranked"]


class Severity(enum.IntEnum):
    """How urgent a finding is; findings are ranked by it first."""

    WARNING = 1
    """Training goes on but learns less or less stably (dead units, saturation)."""
    ERROR = 2
    """Training is failing or about to (non-finite values, overflow, explosion)."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing that went wrong: which rule saw it, where, since when, and how far past the threshold."""

    rule: str
    """Name of the rule (``dead_units``): the rules table of the README explains each."""
    severity: Severity
    message: str
    """One line that says what was seen, with the measured value and the threshold."""
    layers: tuple[str, ...]
    """Layer labels (or parameter names) concerned, in execution order."""
    steps: tuple[int, ...]
    """Captured steps at which the rule's condition held, in order."""
    subject: str
    """What the finding is about (a layer, a parameter, ``model``, a pair of steps): a rule
    reports at most one finding per subject, so a training run announces it once."""
    score: float
    """How far past the threshold the worst value is, in orders of magnitude (>= 0): ranks
    findings of the same severity."""

    @property
    def since(self) -> int:
        """The first captured step at which the condition held."""
        return self.steps[0]

    @property
    def key(self) -> tuple[str, str]:
        """``(rule, subject)``: the identity of a finding across the steps of a run."""
        return self.rule, self.subject

    def line(self) -> str:
        """``ERROR exploding_gradients (since step 40): ...``: the console form."""
        return f"{self.severity.name} {self.rule} (since step {self.since}): {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "rule": self.rule, "severity": self.severity.name.lower(), "message": self.message,
            "layers": list(self.layers), "steps": list(self.steps), "since": self.since,
            "subject": self.subject, "score": self.score,
        }


def ranked(findings: Iterable[Finding]) -> list[Finding]:
    """Most severe first; then furthest past the threshold; then the earliest."""
    return sorted(findings, key=lambda f: (-f.severity, -f.score, f.since, f.rule, f.subject))
