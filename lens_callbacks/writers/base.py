"""The writer protocol: anything with ``write(record)`` and ``close()``."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from lens_callbacks.record import CaptureRecord

__all__ = ["Writer"]


@runtime_checkable
class Writer(Protocol):
    """Receives every capture, in step order, on the ranks that capture.

    ``write`` should not keep references to the record's tensors after it returns: the driver
    drops them to free memory.

    A writer that reads only summaries and metadata, never ``layer.tensor_contents`` or
    ``layer.gradient``, says so with a ``save_tensors = False`` attribute: when no writer needs
    the tensors, captures summarise large CPU tensors as they are made and keep none of them
    (``lens_core.Summaries``), which makes capturing every step much cheaper.
    """

    def write(self, record: CaptureRecord) -> None: ...

    def close(self) -> None: ...
