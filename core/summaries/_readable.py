"""What of a tensor a summary may read: memory its storage still holds, a DTensor's local shard.

A summary reads a tensor after the op that made it has returned, often only at the end of the
step. By then its storage may have been freed or shrunk under it: FSDP frees its all-gather
buffers with ``untyped_storage().resize_(0)``, and other code reuses memory the same way. The
tensor keeps its shape and strides, and torch's kernels do not check them against the storage:
reading it reads freed memory (a segmentation fault, or another tensor's values). The storage's
size tells such a tensor apart without reading a value (:func:`shortfall`).

A storage resized to a size that still holds the view (a larger one, or a smaller one that
still covers it) keeps its values: torch copies them into the new memory.
"""

from __future__ import annotations

import sys

import torch

from lens_core.summaries.summary import LocalShard

__all__ = ["local_shard", "shortfall", "storage_intact"]


def storage_intact(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s storage still holds every element of it.

    False when the storage was freed or shrunk after the tensor was made
    (``untyped_storage().resize_(0)``, as FSDP does with its all-gather buffers): reading such a
    tensor (a summary, ``clone()``, ``torch.save``) reads freed memory. Use it before reading a
    tensor that was kept for later. A ``DTensor`` is checked by its local shard; a tensor with no
    storage of its own (sparse, nested) counts as intact.
    """
    return shortfall(tensor) is None


def shortfall(tensor: torch.Tensor) -> str | None:
    """Why ``tensor``'s values can no longer be read (see :func:`storage_intact`), or None."""
    tensor = local_shard(tensor)[0]
    try:
        held = tensor.untyped_storage().nbytes()
        count = tensor.numel()
        if count == 0:
            return None
        # the farthest element from the storage's start (strides are never negative)
        if tensor.is_contiguous():
            last = tensor.storage_offset() + count - 1
        else:
            steps = zip(tensor.shape, tensor.stride(), strict=True)
            last = tensor.storage_offset() + sum((size - 1) * stride for size, stride in steps)
        needed = (last + 1) * tensor.element_size()
    except (RuntimeError, NotImplementedError, TypeError):  # no storage, or no strides, of its own
        return None
    if held >= needed:
        return None
    return f"its storage holds {held} bytes, its {tuple(tensor.shape)} view needs {needed}"


def local_shard(tensor: torch.Tensor) -> tuple[torch.Tensor, LocalShard | None]:
    """A ``DTensor``'s local tensor, with the :class:`LocalShard` that says which part it is
    (None when every mesh dimension replicates it: it is then the whole tensor); any other
    tensor as it is, with None. Nothing is communicated."""
    if type(tensor) is torch.Tensor or type(tensor) is torch.nn.Parameter:
        return tensor, None
    dtensor_module = sys.modules.get("torch.distributed.tensor")  # no DTensor unless imported
    if dtensor_module is None or not isinstance(tensor, dtensor_module.DTensor):
        return tensor, None
    with torch.no_grad():  # then to_local() is the local tensor itself, no autograd node
        local = tensor.to_local()
    placements = tensor.placements
    if all(placement.is_replicate() for placement in placements):
        return local, None
    coordinate = tensor.device_mesh.get_coordinate()
    return local, LocalShard(tuple(map(repr, placements)), tuple(coordinate or ()))
