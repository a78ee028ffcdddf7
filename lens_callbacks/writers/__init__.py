"""Where captures go: a small protocol, and the writers that implement it."""

from lens_callbacks.writers.base import Writer
from lens_callbacks.writers.disk import DiskWriter

__all__ = ["DiskWriter", "Writer"]
