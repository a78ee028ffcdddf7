"""Statistics and histograms of many tensors, with one device-to-host transfer for all of them.

A training callback summarises every selected activation and gradient at a captured step:
millions of values per step, so the cost is memory passes, and this module is written to make
few of them, into reused buffers.

On an accelerator, reading each number with ``.item()`` would stall the device once per number;
instead every statistic, histogram edge and bin count stays a device tensor until they are
packed into one byte buffer and copied to the host with a single ``.cpu()`` (one per device the
tensors live on; ``lens_core.summaries._device``). On the CPU there is nothing to transfer:
results are read as they come (the code below), which lets a tensor with no NaN or infinity
(nearly all) skip the masking an accelerator always does, and a large tensor can be summarised
the moment it is handed over (:class:`Summaries`), while its values are in cache, and then let
go; only the histogram edges, found for all tensors together, wait for the end.

Histograms are exact: edges run from the minimum to the maximum finite value, and the counts are
what ``numpy.histogram(values, bins=edges)`` gives (``lens_core.summaries._histogram`` says how: the bin of a
value is arithmetic, and the edges are derived from that arithmetic). ``torch.histc`` is not
used: it needs its range on the host (a sync per tensor) and bins with its own arithmetic.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Hashable, Mapping
from typing import Any, cast

import torch

from lens_core.summaries import _host
from lens_core.summaries._device import summarize_on_device
from lens_core.summaries._host import Binned, bin_on_host, stream, with_edges
from lens_core.summaries._passes import Scratch
from lens_core.summaries._readable import local_shard, shortfall
from lens_core.summaries.summary import LocalShard, TensorSummary, check_bins, no_finite_values

__all__ = ["Summaries", "summarize"]


def summarize(tensors: Mapping[str, torch.Tensor], bins: int = 64) -> dict[str, TensorSummary]:
    """Summarises every tensor of ``tensors``, reading the results back in one transfer.

    Use it at a captured step on all the activations and gradients at once: the work runs on
    the tensors' device and the host waits once, not once per tensor or per statistic.
    Tensors that are views of the same elements (a reshape, a transpose) are summarised once.

    A ``DTensor`` is summarised by this rank's local shard, and its summary says so
    (``TensorSummary.shard``; None when the tensor is replicated, the local tensor then being
    the whole of it). Summaries never communicate: whole-tensor statistics would take a
    collective (``full_tensor()``) that every rank must join with the same tensors in the same
    order, so a call made on one rank only (``if rank == 0: summarize(...)``) or on ranks that
    ran different layers would hang, and it would gather on each rank the memory that sharding
    exists to spread. For the whole tensor, call it on every rank with
    ``{"w": w.full_tensor()}``.

    Args:
        tensors: name -> dense real tensor or ``DTensor`` (any shape, dtype, device;
            ``requires_grad`` is fine, nothing is recorded by autograd).
        bins: number of histogram bins.

    Returns:
        name -> :class:`TensorSummary`, in the order of ``tensors``.

    Raises:
        TypeError: a value is not a tensor, or is complex.
        ValueError: ``bins`` is not an int from 1 to 65536, or a tensor's storage no longer
            holds it (freed or shrunk, see ``storage_intact``).

    Example::

        summaries = summarize({"conv1": layer.tensor_contents, "grad/conv1": layer.gradient})
        summaries["conv1"].histogram.counts
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of name -> tensor, got {type(tensors).__name__}.")
    summaries = Summaries(bins)
    for name, tensor in tensors.items():
        summaries.add(name, tensor)
    found = summaries.result()
    if summaries.skipped:
        key, why = next(iter(summaries.skipped.items()))
        raise ValueError(
            f"tensors[{key!r}] can no longer be read: {why}. Its storage was freed or shrunk "
            "after it was made (FSDP frees its all-gather buffers so); summarise it before then."
        )
    return cast(dict[str, TensorSummary], found)


class Summaries:
    """Summaries of tensors handed over one at a time, as a training step makes them.

    :func:`summarize` takes every tensor at once; a captured training step would then hold
    each activation and gradient until its end, memory the backward pass cannot reuse (fresh
    pages at every step). :meth:`add` summarises a large CPU tensor at once instead, while its
    values are in cache, and keeps nothing of it: everything but the histogram's inner edges,
    which :meth:`result` works out for all tensors together. Other tensors are kept until
    :meth:`result`: small ones (cheaper together), those on an accelerator (they stay there
    until one transfer), sparse or quantized ones, and, as a copy, large ones that need the
    general binning (a single distinct value, a range so wide or so narrow that its width or
    scale overflows).

    A tensor whose elements and values are those of one added before (a view of it, with no
    write in between: a reshape, a transpose, a gradient passed on unchanged) shares its summary.

    Nothing is read from a tensor whose storage no longer holds it: one freed or shrunk before
    it is summarised (FSDP frees its all-gather buffers with ``untyped_storage().resize_(0)``
    after the forward of each module) has no summary in :meth:`result`, and :attr:`skipped`
    says why. A ``DTensor`` is summarised by its local shard (see :func:`summarize`).

    Example::

        summaries = Summaries(bins=64)
        summaries.add("conv1", activation)  # summarised now if streams(activation)
        summaries.result()["conv1"].histogram.edges

    Args:
        bins: number of histogram bins.

    Raises:
        ValueError: ``bins`` is not an int from 1 to 65536.
    """

    def __init__(self, bins: int = 64) -> None:
        self.bins = check_bins(bins)
        self._keys: dict[Hashable, None] = {}  # every key, in the order added
        self._kept: dict[Hashable, torch.Tensor] = {}
        self._streamed: dict[Hashable, Binned] = {}
        self._twins: dict[Hashable, Hashable] = {}  # key -> the key whose summary it shares
        self._seen: dict[_Key, tuple[weakref.ref[torch.UntypedStorage], int, Hashable]] = {}
        self._shards: dict[Hashable, LocalShard] = {}
        self._lost: dict[Hashable, str] = {}  # key -> why its tensor could not be read
        self._scratch = Scratch(torch.device("cpu"))

    def __contains__(self, key: Hashable) -> bool:
        return key in self._keys

    @staticmethod
    def streams(tensor: torch.Tensor) -> bool:
        """Whether :meth:`add` summarises ``tensor`` at once: then the caller may free it or
        write to it afterwards; otherwise it must leave it as it is until :meth:`result`."""
        tensor = local_shard(tensor)[0]
        return (
            tensor.device.type == "cpu" and tensor.numel() > _host.SMALL and tensor.layout == torch.strided
            and not (tensor.is_complex() or tensor.is_quantized or tensor.is_nested)
        )

    def add(self, key: Hashable, tensor: torch.Tensor, *, shard: LocalShard | None = None) -> None:
        """Adds ``tensor``'s summary under ``key`` (see :meth:`streams` for when it is made).

        Args:
            key: what :meth:`result` files the summary under.
            tensor: a dense real tensor, or a ``DTensor`` (its local shard is summarised).
            shard: the part of a ``DTensor`` that ``tensor`` is, when the caller took it out
                itself (the local shards of several micro-batches, concatenated).

        Raises:
            TypeError: ``tensor`` is not a tensor, or is complex.
            ValueError: ``key`` was added before.
        """
        if key in self._keys:
            raise ValueError(f"Summaries.add: {key!r} was added before; each key takes one tensor.")
        # the summary's own ops are not the model's: no capture records them, autograd neither
        with torch._C.DisableTorchFunction(), torch.no_grad():
            tensor, of_dtensor = local_shard(_checked(key, tensor))
            tensor = tensor.detach()
            shard = shard if shard is not None else of_dtensor
            if shard is not None:
                self._shards[key] = shard
            lost = shortfall(tensor)
            twin = None if lost is not None else self._twin(key, tensor)
            if lost is not None:
                self._lost[key] = lost
            elif twin is not None:
                self._twins[key] = twin
            elif not self.streams(tensor):
                self._kept[key] = tensor
            else:
                streamed = stream(tensor, self.bins, self._scratch)
                if streamed is None:
                    self._kept[key] = tensor.clone()  # for the general code, at the end
                else:
                    self._streamed[key] = streamed
        self._keys[key] = None

    def _twin(self, key: Hashable, tensor: torch.Tensor) -> Hashable | None:
        """The key of a tensor added before with the same elements, still holding the same values
        (its storage alive, its version unchanged); ``tensor`` becomes the one to match if none."""
        try:
            elements, storage, version = _elements(tensor), tensor.untyped_storage(), tensor._version
        except (RuntimeError, NotImplementedError):  # no storage, or no version (inference mode)
            return None
        seen = self._seen.get(elements)
        if seen is not None and seen[0]() is storage and seen[1] == version:
            return seen[2]
        self._seen[elements] = (weakref.ref(storage), version, key)
        return None

    @property
    def skipped(self) -> dict[Hashable, str]:
        """Key -> why its tensor was not summarised: its storage no longer held it (freed or
        shrunk) when it was to be read. :meth:`add` finds those freed before it, :meth:`result`
        those freed while kept; in the order added."""
        return {key: self._lost[key] for key in self._keys if key in self._lost}

    def clear(self) -> None:
        """Forgets every summary, keeping the scratch memory for the next step's."""
        tables = (self._keys, self._kept, self._streamed, self._twins, self._seen, self._shards, self._lost)
        for table in tables:
            table.clear()

    def discard(self, key: Hashable) -> None:
        """Leaves ``key`` out of :meth:`result` (no error if it was not added)."""
        self._keys.pop(key, None)

    def result(self) -> dict[Hashable, TensorSummary]:
        """Every summary, in the order added (one transfer per accelerator holding tensors);
        none for the keys in :attr:`skipped`."""
        found: dict[Hashable, TensorSummary] = {}
        binned: dict[Hashable, Binned] = dict(self._streamed)
        with torch._C.DisableTorchFunction(), torch.no_grad():
            by_device: dict[torch.device, list[Hashable]] = {}
            for key, tensor in self._kept.items():
                lost = shortfall(tensor)  # freed since it was added: never read
                if lost is not None:
                    self._lost[key] = lost
                elif tensor.numel():
                    by_device.setdefault(tensor.device, []).append(key)
                else:
                    found[key] = no_finite_values(0, 0, 0)
            for device, group in by_device.items():
                tensors = [self._kept[key] for key in group]
                if device.type == "cpu":
                    binned.update(zip(group, bin_on_host(tensors, self.bins, self._scratch), strict=True))
                else:
                    found.update(zip(group, summarize_on_device(tensors, self.bins), strict=True))
            found.update(with_edges(binned, self.bins))  # every CPU tensor's edges in one search
        summaries: dict[Hashable, TensorSummary] = {}
        for key in self._keys:
            source = self._twins.get(key, key)
            if source in self._lost:  # a view of a tensor that was freed is freed with it
                self._lost[key] = self._lost[source]
                continue
            shard, summary = self._shards.get(key), found[source]
            summaries[key] = summary if shard is None else dataclasses.replace(summary, shard=shard)
        return summaries


def _checked(name: Hashable, tensor: Any) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensors[{name!r}] is a {type(tensor).__name__}, not a torch.Tensor.")
    if tensor.is_complex():
        raise TypeError(
            f"tensors[{name!r}] is complex ({tensor.dtype}); summarise a real view of it, "
            "e.g. tensor.abs() or torch.view_as_real(tensor)."
        )
    return tensor


# What identifies the elements of a tensor: its device, dtype, first element and the memory it
# spans, as (stride, size) steps from the finest out, neighbours that continue each other merged:
# every shape and permutation of the same elements (a reshape, a transpose) has the same key.
_Key = tuple[torch.device, torch.dtype, int, bool, tuple[tuple[int, int], ...]]


def _elements(tensor: torch.Tensor) -> _Key:
    steps: list[tuple[int, int]] = []
    dims = zip(tensor.stride(), tensor.shape, strict=True)
    for stride, size in sorted(dim for dim in dims if dim[1] != 1):
        if steps and steps[-1][0] * steps[-1][1] == stride:  # continues the step before it
            steps[-1] = (steps[-1][0], steps[-1][1] * size)
        else:
            steps.append((stride, size))
    return (tensor.device, tensor.dtype, tensor.data_ptr(), tensor.is_neg(), tuple(steps))
