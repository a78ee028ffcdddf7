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
    """

    def write(self, record: CaptureRecord) -> None: ...

    def close(self) -> None: ...
