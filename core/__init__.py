"""lens_core: record every operation of a PyTorch forward pass, and its graph.

Depends on torch only. The vocabulary follows the TorchLens README (``log_forward_pass``,
``ModelHistory``, ``tensor_contents``, labels such as ``conv2d_3_7`` and ``linear_1_1:2``).
"""

from lens_core._rng import get_rng_states, set_rng_states
from lens_core.capture import (
    FRAMEWORK_PACKAGES,
    Capture,
    FrameInfo,
    Layer,
    ModelHistory,
    ParamInfo,
    capture,
    get_model_metadata,
    log_forward_pass,
)
from lens_core.checks import (
    AnomalyError,
    AnomalyReport,
    LayerCheck,
    ValidationReport,
    explain,
    first_nonfinite,
    investigate,
    validate_model_activations,
    validation_report,
)
from lens_core.errors import CaptureError, LayerNotFoundError, LensError
from lens_core.graph import show_model_graph
from lens_core.store import CaptureFormatError, SeveralCapturesError, load, load_extra, load_summaries, save
from lens_core.summaries import Histogram, LocalShard, Summaries, TensorSummary, storage_intact, summarize

__all__ = [
    "FRAMEWORK_PACKAGES",
    "AnomalyError",
    "AnomalyReport",
    "Capture",
    "CaptureError",
    "CaptureFormatError",
    "FrameInfo",
    "Histogram",
    "Layer",
    "LayerCheck",
    "LayerNotFoundError",
    "LensError",
    "LocalShard",
    "ModelHistory",
    "ParamInfo",
    "SeveralCapturesError",
    "Summaries",
    "TensorSummary",
    "ValidationReport",
    "capture",
    "explain",
    "first_nonfinite",
    "get_model_metadata",
    "get_rng_states",
    "investigate",
    "load",
    "load_extra",
    "load_summaries",
    "log_forward_pass",
    "save",
    "set_rng_states",
    "show_model_graph",
    "storage_intact",
    "summarize",
    "validate_model_activations",
    "validation_report",
]
__version__ = "0.1.0"
