"""What summaries read: never a storage freed under a kept tensor; a DTensor's local shard."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lens_core.summaries import LocalShard, Summaries, TensorSummary, local_shard, storage_intact, summarize
from tests.conftest import require


def _free(tensor: torch.Tensor, nbytes: int = 0) -> None:
    tensor.untyped_storage().resize_(nbytes)  # what FSDP does to its all-gather buffers


def test_storage_intact_compares_the_storage_with_what_the_view_needs() -> None:
    base = torch.arange(100.0)
    views = {
        "base": base, "head": base[:10], "tail": base[90:], "strided": base[::3],
        "matrix": base.view(10, 10).t(), "expanded": base[:5].expand(4, 5), "element": base[7],
    }
    assert all(storage_intact(view) for view in views.values())
    _free(base, 40 * 4)  # shrunk: the first 40 floats remain
    assert {name for name, view in views.items() if storage_intact(view)} == {"head", "expanded", "element"}
    _free(base, 400 * 4)  # larger: moved, its values copied
    assert all(storage_intact(view) for name, view in views.items() if name in ("head", "element"))
    _free(base)
    assert not any(storage_intact(view) for view in views.values())
    assert storage_intact(base[:0])  # no element: nothing to read
    assert storage_intact(torch.eye(3).to_sparse())  # no storage of its own to check
    assert storage_intact(torch.empty(5, device="meta"))


def test_a_tensor_freed_after_it_was_added_is_skipped_with_the_reason_and_the_rest_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    scratch, kept, large = (torch.randn(n, generator=g) for n in (300, 50, 5000))
    expected = summarize({"kept": kept.clone(), "large": large.clone(), "head": scratch[:20].clone()}, 16)
    summaries = Summaries(bins=16)
    summaries.add("scratch", scratch)  # small: kept until result()
    summaries.add("reshaped", scratch.view(30, 10))  # the same elements: shares its summary
    summaries.add("head", scratch[:20])  # fewer elements: its own, kept
    summaries.add("kept", kept)
    summaries.add("large", large)  # summarised at once: later frees cannot touch it
    _free(large)
    _free(scratch, 25 * 4)  # shrunk: the head survives, with its values
    found = summaries.result()
    assert found == {"head": expected["head"], "kept": expected["kept"], "large": expected["large"]}
    assert list(summaries.skipped) == ["scratch", "reshaped"]
    assert summaries.skipped["scratch"] == "its storage holds 100 bytes, its (300,) view needs 1200"
    assert summaries.result() == found  # asked again: the same, nothing read
    summaries.clear()
    assert summaries.skipped == {}


def test_a_tensor_freed_before_it_is_added_is_never_read() -> None:
    large, small = torch.randn(5000), torch.randn(10)
    _free(large)
    _free(small)
    summaries = Summaries()
    summaries.add("large", large)  # would be binned at once: refused at the door
    summaries.add("small", small)
    summaries.add("fine", torch.ones(3))
    assert list(summaries.result()) == ["fine"]
    assert list(summaries.skipped) == ["large", "small"]
    assert "large" in summaries  # added (a second add is still an error), with no summary


def test_summarize_refuses_a_freed_tensor_naming_it() -> None:
    x = torch.randn(10)
    _free(x)
    with pytest.raises(ValueError, match=r"tensors\['x'\] can no longer be read: its storage holds 0 bytes"):
        summarize({"ok": torch.ones(2), "x": x})


def test_a_shard_label_round_trips_through_json_and_whole_tensors_have_none() -> None:
    summary = summarize({"x": torch.arange(6.0)})["x"]
    assert summary.shard is None
    assert "shard" not in summary.to_dict()  # files of whole tensors are as before
    labelled = dataclasses.replace(summary, shard=LocalShard(("Shard(dim=0)", "Replicate()"), (1, 0)))
    data = labelled.to_dict()
    assert data["shard"] == {"placements": ["Shard(dim=0)", "Replicate()"], "coordinate": [1, 0]}
    assert TensorSummary.from_dict(data) == labelled
    with pytest.raises(ValueError, match="expected a string"):
        TensorSummary.from_dict({**data, "shard": {"placements": [0], "coordinate": [0]}})


def test_local_shard_leaves_other_tensors_as_they_are() -> None:
    x, p = torch.ones(3), nn.Parameter(torch.ones(3))
    assert local_shard(x) == (x, None)
    assert local_shard(p)[0] is p


# -- DTensor, on a real one-process gloo mesh ---------------------------------------------------


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[object]:
    require(dist.is_available() and dist.is_gloo_available(), "torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_a_dtensor_is_summarised_by_its_local_shard_labelled_as_such(mesh: object) -> None:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = torch.Generator().manual_seed(1)
    plain = {"w": torch.randn(64, 40, generator=g), "b": torch.randn(8, generator=g)}
    expected = summarize(plain)
    replicated = {name: distribute_tensor(t, mesh, [Replicate()]) for name, t in plain.items()}  # type: ignore[arg-type]
    assert summarize(replicated) == expected  # a replicated DTensor's local tensor is all of it
    sharded = {name: distribute_tensor(t, mesh, [Shard(0)]) for name, t in plain.items()}  # type: ignore[arg-type]
    found = summarize(sharded)
    for name in plain:
        assert found[name].shard == LocalShard(("Shard(dim=0)",), (0,))
        assert dataclasses.replace(found[name], shard=None) == expected[name]
    assert Summaries.streams(sharded["w"])  # decided on the local tensor: a large CPU one


def test_dtensor_parameters_and_gradients_are_summarised_and_a_freed_shard_skipped(mesh: object) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    weight = nn.Parameter(distribute_tensor(torch.randn(30, 4), mesh, [Shard(0)]))  # type: ignore[arg-type]
    (weight * 3).sum().backward()
    assert weight.grad is not None
    found = summarize({"weight": weight, "grad": weight.grad})
    assert (found["grad"].numel, found["grad"].mean) == (120, 3.0)  # (its placements are torch's choice)
    assert found["weight"].shard == LocalShard(("Shard(dim=0)",), (0,))
    summaries = Summaries()
    summaries.add("weight", weight)
    _free(weight.to_local())
    assert summaries.result() == {}
    assert list(summaries.skipped) == ["weight"]
    assert not storage_intact(weight)  # checked by its local shard
