"""Saving a :class:`ModelHistory` to a folder and loading it back, without pickle.

A saved capture is a folder of three files::

    history.json          every plain-data field of the history and of each layer
    summaries.json        TensorSummary.to_dict() of each summarised tensor (may be empty)
    tensors.safetensors   saved activations (key: layer label) and gradients (``grad/<label>``)

JSON and safetensors hold data only, so loading a capture from someone else runs no code of
theirs. ``save`` writes into a hidden sibling folder and renames it into place, so ``path``
either holds a complete capture or nothing; ``load`` reads tensors lazily, each one the first
time its ``tensor_contents`` or ``gradient`` is read.
"""

from lens_core.store._layout import FORMAT_VERSION, CaptureFormatError
from lens_core.store._read import load, load_extra, load_summaries
from lens_core.store._write import save

__all__ = ["FORMAT_VERSION", "CaptureFormatError", "load", "load_extra", "load_summaries", "save"]
