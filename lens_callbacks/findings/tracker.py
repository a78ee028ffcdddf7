"""``FindingsTracker``: runs the rules as training runs and says what is new at each capture."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from torch import nn

from lens_callbacks.findings.finding import Finding, ranked
from lens_callbacks.findings.rules import DEFAULT_RULES, Rule, find
from lens_callbacks.findings.snapshot import StepSummaries
from lens_callbacks.findings.updates import UpdateMeter
from lens_callbacks.record import CaptureRecord

__all__ = ["FindingsTracker", "log_findings"]

logger = logging.getLogger("lens_callbacks.findings")

# Captures kept from the start of the run: the baseline of the rules that compare with it.
_FIRST = 3


class FindingsTracker:
    """Runs the rules over the captured training steps as they come; reports each finding once.

    A driver hands it every record after building it; :meth:`observe` returns the findings
    not reported before (a finding is new when its rule and subject are: a dead layer is
    announced once, not at every capture). It keeps the summaries of the first captures and
    of the last two, no tensor, so its memory and time per capture stay flat over a run. The
    whole list, with every step each finding held at, comes from
    ``find(load_run(run_folder))`` or ``lens findings RUN``.

    Example::

        tracker = FindingsTracker()
        new = tracker.observe(record, model)   # after each captured step
        log_findings(new)
        ...
        log_findings(tracker.close())          # the update ratios of the last capture

    Args:
        rules: the rules to run (default: all of :data:`DEFAULT_RULES`).
        measure_updates: measure the update-to-weight ratio of the optimizer step after each
            capture (needs ``model`` in :meth:`observe`; holds one copy of the used weight
            matrices during that optimizer step, see :class:`UpdateMeter`).
    """

    def __init__(self, rules: Iterable[Rule] = DEFAULT_RULES, *, measure_updates: bool = True) -> None:
        self.rules = tuple(rules)
        for rule in self.rules:
            if not isinstance(rule, Rule):
                raise TypeError(f"rules holds {rule!r}, which is not a lens_callbacks.findings.Rule.")
        if not isinstance(measure_updates, bool):
            raise TypeError(f"measure_updates={measure_updates!r}: use True or False.")
        self.measure_updates = measure_updates
        self._first: list[StepSummaries] = []
        self._last: list[StepSummaries] = []
        self._reported: set[tuple[str, str]] = set()
        self._meter = UpdateMeter()

    def observe(self, record: CaptureRecord, model: nn.Module | None = None) -> list[Finding]:
        """Adds a captured step; returns the findings it makes new, most severe first.

        Records of other stages than training are ignored (their statistics do not come from
        the steps that train the model).
        """
        if record.stage != "train":
            return []
        self._collect_updates()
        previous = self._last[-1].step if self._last else None
        snapshot = StepSummaries.from_record(record, previous)
        if len(self._first) < _FIRST:
            self._first.append(snapshot)
        self._last = [*self._last[-1:], snapshot]
        if self.measure_updates and model is not None:
            self._meter.start(model, record.parameter_gradients)
        return self._new()

    @property
    def last(self) -> StepSummaries | None:
        """The summaries of the latest captured step (its ``updates`` fill in after its optimizer step)."""
        return self._last[-1] if self._last else None

    def close(self) -> list[Finding]:
        """The findings the last capture's update ratios make new; stops measuring."""
        self._collect_updates()
        self._meter.stop()
        return self._new()

    def _collect_updates(self) -> None:
        ratios = self._meter.take()
        if ratios and self._last:
            self._last[-1].updates.update(ratios)

    def _window(self) -> list[StepSummaries]:
        kept = {id(s): s for s in [*self._first, *self._last]}
        return sorted(kept.values(), key=lambda s: s.step)

    def _new(self) -> list[Finding]:
        new = [finding for finding in find(self._window(), self.rules) if finding.key not in self._reported]
        self._reported.update(finding.key for finding in new)
        return new


def log_findings(findings: Sequence[Finding]) -> None:
    """One warning line per finding on the ``lens_callbacks.findings`` logger (rank zero's job:
    call it there). Python shows warnings of a library's logger on stderr unless configured."""
    for finding in ranked(findings):
        logger.warning("lens: %s", finding.line())

