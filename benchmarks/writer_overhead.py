"""What each writer adds to a capture: resnet18, all layers, summaries only (CPU).

One captured training step (forward, loss, backward, summaries) is built once; each writer then
writes it repeatedly and the median time per write is printed next to the capture's own cost.

    python benchmarks/writer_overhead.py [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

import lens_core as lc
from lens_callbacks import DiskWriter, TensorBoardWriter, WandbWriter, Writer
from lens_callbacks.record import CaptureRecord, build_record


def capture_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[CaptureRecord, float]:
    start = time.perf_counter()
    with lc.capture(model, "all", gradients=True) as cap:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    record = build_record(0, "train", 0, [cap.history], model, bins=64)
    model.zero_grad(set_to_none=True)
    return record, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="64x64 inputs, 1 repeat")
    args = parser.parse_args(argv)
    repeats, size = (1, 64) if args.quick else (args.repeats, 224)
    torch.set_num_threads(2)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    x, y = torch.randn(2, 3, size, size), torch.randint(0, 1000, (2,))
    step = statistics.median(capture_step(model, x, y)[1] for _ in range(repeats))
    record, _ = capture_step(model, x, y)
    with tempfile.TemporaryDirectory() as root:
        run = wandb.init(project="lens-bench", dir=root)
        writers: dict[str, Callable[[], Writer]] = {
            "DiskWriter (summaries)": lambda: DiskWriter(Path(root) / "disk"),
            "TensorBoardWriter": lambda: TensorBoardWriter(Path(root) / "tb"),
            "WandbWriter (no graph)": lambda: WandbWriter(run, graph=False),
            "WandbWriter (with graph)": lambda: WandbWriter(run),
        }
        print(f"| writer | ms per capture | vs the captured step ({step * 1e3:.0f} ms) |\n|---|---|---|")
        for index, (name, make) in enumerate(writers.items()):
            writer, times = make(), []
            for repeat in range(repeats):
                record.step = 10 * (index * repeats + repeat)  # W&B wants increasing steps
                start = time.perf_counter()
                writer.write(record)
                times.append(time.perf_counter() - start)
            writer.close()
            median = statistics.median(times)
            print(f"| {name} | {median * 1e3:.1f} | {median / step:.2f}x |")
        run.finish()
    print(f"\nresnet18, batch 2, {size}x{size}, {len(record.activations)} layers with activation and "
          f"gradient summaries; medians of {repeats}; CPU, 2 threads.")


if __name__ == "__main__":
    main()
