"""Training health findings: what went wrong, where and since when, from the captures of a run.

Rules (:mod:`~lens_callbacks.findings.rules`) read the summaries every capture records and
name vanishing or exploding gradients, dead units, saturation, collapsing attention,
overflow ahead in half precision, sudden jumps and oversized updates, with the layers and
steps concerned. :class:`FindingsTracker` runs them as training runs; :func:`load_run` and
:func:`find` over a run folder on disk (``lens findings RUN``, ``lens report RUN``).
"""

from lens_callbacks.findings.finding import Finding, Severity, ranked
from lens_callbacks.findings.rules import (
    DEFAULT_RULES,
    AttentionEntropyCollapse,
    DeadUnits,
    ExplodingGradients,
    Fp16Underflow,
    NonFinite,
    NumericHeadroom,
    Rule,
    Saturation,
    SuddenChange,
    UpdateRatio,
    VanishingGradients,
    find,
)
from lens_callbacks.findings.snapshot import LayerFacts, StepSummaries, load_run
from lens_callbacks.findings.tracker import FindingsTracker, log_findings
from lens_callbacks.findings.updates import UpdateMeter

__all__ = [
    "DEFAULT_RULES",
    "AttentionEntropyCollapse",
    "DeadUnits",
    "ExplodingGradients",
    "Finding",
    "FindingsTracker",
    "Fp16Underflow",
    "LayerFacts",
    "NonFinite",
    "NumericHeadroom",
    "Rule",
    "Saturation",
    "Severity",
    "StepSummaries",
    "SuddenChange",
    "UpdateMeter",
    "UpdateRatio",
    "VanishingGradients",
    "find",
    "load_run",
    "log_findings",
    "ranked",
]
