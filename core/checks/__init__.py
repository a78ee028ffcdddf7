"""Checks of what a capture saw: ``validation`` replays every op from its saved parents;
``forensics`` names the op where a value first went non-finite."""

from lens_core.checks.forensics import AnomalyError, AnomalyReport, explain, first_nonfinite, investigate
from lens_core.checks.validation import (
    LayerCheck,
    ValidationReport,
    validate_model_activations,
    validation_report,
)

__all__ = [
    "AnomalyError",
    "AnomalyReport",
    "LayerCheck",
    "ValidationReport",
    "explain",
    "first_nonfinite",
    "investigate",
    "validate_model_activations",
    "validation_report",
]
