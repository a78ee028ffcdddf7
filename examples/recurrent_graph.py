"""A recurrent model's graph, rolled and unrolled: loops become passes of one layer (x4).

    python examples/recurrent_graph.py [--out out/recurrent] [--quick]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import lens_core as lc


class SimpleRecurrent(nn.Module):
    """The TorchLens README's example: one linear layer applied four times."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features=5, out_features=5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(4):
            x = self.fc(x)
            x = x + 1
            x = x * 2
        return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/recurrent"))
    parser.add_argument("--quick", action="store_true", help="accepted for the smoke test")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = SimpleRecurrent()
    history = lc.log_forward_pass(model, torch.rand(6, 5), layers_to_save="all",
                                  vis_opt="rolled", vis_outpath=str(args.out / "rolled"),
                                  vis_fileformat="svg")
    unrolled = history.render_graph("unrolled", vis_outpath=str(args.out / "unrolled"), vis_fileformat="svg")
    print(history)
    print(history["linear_1_1:2"].tensor_contents)  # the second pass of the linear layer
    print(f"graphs: {args.out / 'rolled.svg'} (linear_1_1 x4) and {unrolled}")


if __name__ == "__main__":
    main()
