"""Recording a forward pass: the mode and module hooks that see every op, the records they make,
the layer selection, and the :class:`ModelHistory` they build.

``session`` is the entry point (:class:`Capture`, :func:`capture`, :func:`log_forward_pass`);
``recorder`` is the hot path that runs once per torch op; ``records`` and ``history`` are what a
capture gives back; ``gradients`` fills in each op's gradient in the backward pass.
"""

from lens_core.capture.callers import FRAMEWORK_PACKAGES
from lens_core.capture.history import ModelHistory
from lens_core.capture.records import FrameInfo, Layer, ParamInfo
from lens_core.capture.session import Capture, capture, get_model_metadata, log_forward_pass

__all__ = [
    "FRAMEWORK_PACKAGES", "Capture", "FrameInfo", "Layer", "ModelHistory", "ParamInfo", "capture",
    "get_model_metadata", "log_forward_pass",
]
