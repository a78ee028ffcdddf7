"""Trains a small MLP sharded over 2 CPU processes (gloo) with ``Lens``; run by test_sharded.py.

Usage: python -m tests.callbacks.fsdp_train OUT VARIANT   (VARIANT: fsdp2, fsdp1, fsdp1_flat, tp)

Each rank writes ``OUT/rank_<k>.json``: the layers of the captured step, the parameter names its
ops are linked to, and the summaries of the parameter gradients next to an oracle: the full
gradient gathered independently here (``full_tensor()`` or FSDP1's ``summon_full_params``).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import lens_core as lc
from lens_callbacks import Lens
from tests.callbacks.helpers import RecordWriter

WORLD = 2


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))



def _shard(model: nn.Module, variant: str) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    if variant == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for module in (model.up, model.down):
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if variant == "tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        return parallelize_module(model, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(
        model, device_id=torch.device("cpu"), use_orig_params=variant == "fsdp1"
    )


def _expected_gradients(model: nn.Module, variant: str, rank: int) -> dict[str, float]:
    """name -> L2 norm of the part of the gradient this rank holds, cut from the whole gradient
    gathered without lens_core (``full_tensor()``), by the placement of its shard."""
    if variant.startswith("fsdp1"):  # flat shards: each rank holds slices of some parameters
        return {n: p.grad.double().norm().item() for n, p in model.named_parameters() if p.grad is not None}
    expected = {}
    for name, param in model.named_parameters():
        grad = param.grad
        whole = grad.full_tensor()
        for placement in grad.placements:
            if placement.is_shard():
                whole = torch.chunk(whole, WORLD, dim=placement.dim)[rank]
        expected[name] = whole.double().norm().item()
    return expected


def _summary(summary: lc.TensorSummary) -> dict[str, Any]:
    shard = summary.shard
    return {"l2_norm": summary.l2_norm, "shard": None if shard is None else str(shard)}


def worker(rank: int, out: str, variant: str, port: str) -> None:
    """Runs one rank, then leaves with os._exit: a gloo process that exits normally now and then
    aborts in the interpreter's teardown ("terminate called without an active exception")
    after a run that succeeded, which would fail the test for nothing of ours."""
    try:
        _rank(rank, out, variant, port)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def _rank(rank: int, out: str, variant: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = _shard(MLP(), variant)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        keep = RecordWriter()
        lens = Lens(model, steps=[1], writers=[keep])
        lens.rank, lens.enabled = rank, True
        generator = torch.Generator().manual_seed(rank)
        oracle: dict[str, float] = {}
        for step in range(3):
            x = torch.randn(4, 8, generator=generator)
            with lens.step(step):
                model(x).square().mean().backward()
            if step == 1:
                oracle = _expected_gradients(model, variant, rank)
            optimizer.step()
            optimizer.zero_grad()
        lens.close()
        (record,) = keep.records
        history = record.history
        Path(out, f"rank_{rank}.json").write_text(json.dumps({
            "layers": [layer.layer_type for layer in history],
            "modules": [layer.module for layer in history],
            "params": sorted({p.name for layer in history for p in layer.params}),
            "named_parameters": [n for n, _ in model.named_parameters()],
            "parameter_gradients": {n: _summary(s) for n, s in record.parameter_gradients.items()},
            "oracle": oracle,
            "skipped": [list(key) for key in record.skipped],
        }))
    finally:
        dist.barrier()  # no rank leaves while another still gathers from it
        dist.destroy_process_group()


def main() -> None:
    out, variant, port = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.multiprocessing.spawn(worker, args=(out, variant, port), nprocs=WORLD)


if __name__ == "__main__":
    main()
