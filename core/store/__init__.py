"""Saving a :class:`ModelHistory` to a folder and loading it back, without pickle.

A saved capture is a folder of three files::

    history.json          every plain-data field of the history and of each layer, the source
                          lines around each distinct call-stack frame (``code_context``) and
                          the SHA-256 of each stored tensor's bytes (``tensor_sha256``)
    summaries.json        TensorSummary.to_dict() of each summarised tensor (may be empty)
    tensors.safetensors   saved activations (key: layer label) and gradients (``grad/<label>``)

JSON and safetensors hold data only, so loading a capture from someone else runs no code of
theirs; and ``load`` treats every file as untrusted (the threat model in the README): regular
files of the folder only, never a link, sizes and nesting checked before parsing, the tensor
file's header checked against the file and ``history.json`` before any tensor is read, each
tensor against its digest when read, any problem a :class:`CaptureFormatError`. ``save``
writes into a hidden sibling folder and renames it into place, so ``path`` either holds a
complete capture or nothing; ``load`` reads tensors lazily, each one the first time its
``tensor_contents`` or ``gradient`` is read.

Training writes one capture per micro-batch into a step folder (``step_000100/micro_batch_0/``,
see :mod:`lens_core.store.folders`); ``load`` takes those too: a step of one micro-batch loads
as its history, a step of several with ``micro_batch=``, and a run folder is refused with the
steps it holds (:class:`SeveralCapturesError`).
"""

from lens_core.store._layout import FORMAT_VERSION, CaptureFormatError, SeveralCapturesError
from lens_core.store._read import load, load_extra, load_summaries
from lens_core.store._write import save
from lens_core.store.folders import StepFolder, micro_batch_folders, step_folders

__all__ = [
    "FORMAT_VERSION",
    "CaptureFormatError",
    "SeveralCapturesError",
    "StepFolder",
    "load",
    "load_extra",
    "load_summaries",
    "micro_batch_folders",
    "save",
    "step_folders",
]
