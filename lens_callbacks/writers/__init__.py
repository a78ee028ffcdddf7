"""Where captures go: a small protocol, and the writers that implement it.

The TensorBoard and W&B writers import their packages only when constructed.
"""

from lens_callbacks.writers.base import Writer
from lens_callbacks.writers.disk import DiskWriter
from lens_callbacks.writers.tensorboard import TensorBoardWriter
from lens_callbacks.writers.wandb import WandbWriter

__all__ = ["DiskWriter", "TensorBoardWriter", "WandbWriter", "Writer"]
