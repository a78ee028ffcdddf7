"""lens_callbacks: capture the real training step with lens_core, at chosen steps.

``Lens`` drives a plain loop; ``LensCallback`` (imported on first use, it needs Lightning) maps
Lightning's hooks onto it. Writers decide where captures go.
"""

from __future__ import annotations

from typing import Any

from lens_callbacks.lens import Lens
from lens_callbacks.record import CaptureRecord
from lens_callbacks.schedule import Schedule
from lens_callbacks.writers import DiskWriter, TensorBoardWriter, WandbWriter, Writer

__all__ = [
    "CaptureRecord", "DiskWriter", "Lens", "LensCallback", "LensTrainerCallback", "Schedule",
    "TensorBoardWriter", "WandbWriter", "Writer",
]


def __getattr__(name: str) -> Any:
    # Lightning and transformers are optional: each is imported when its callback is asked for.
    if name == "LensCallback":
        from lens_callbacks.callback import LensCallback  # noqa: PLC0415

        return LensCallback
    if name == "LensTrainerCallback":
        from lens_callbacks.hf_trainer import LensTrainerCallback  # noqa: PLC0415

        return LensTrainerCallback
    raise AttributeError(f"module 'lens_callbacks' has no attribute {name!r}")
