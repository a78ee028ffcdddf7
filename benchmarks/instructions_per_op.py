"""Capture overhead in instructions per op, which do not drift as wall-clock time does here.

Runs itself under ``valgrind --tool=callgrind`` twice (plain forwards, captured forwards), with
instrumentation switched on only around ``--forwards`` forwards after two warm-ups, and prints
instructions per forward and the capture's extra instructions per recorded op. Each run takes
about two minutes (valgrind runs the interpreter and torch's import uninstrumented but slowly).

    python benchmarks/instructions_per_op.py [--forwards 3] [--framework-off]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def _measured(mode: str, forwards: int, framework_off: bool) -> None:
    """The part that runs under valgrind: warm up, then count ``forwards`` forwards."""
    import torch
    import torchvision

    import lens_core

    torch.set_num_threads(1)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    options = {"framework": ()} if framework_off else {}

    def forward() -> None:
        with torch.no_grad():
            if mode == "plain":
                model(x)
            else:
                lens_core.log_forward_pass(model, x, layers_to_save="all", **options)

    for _ in range(2):
        forward()
    print("ops", len(lens_core.get_model_metadata(model, x)), flush=True)
    subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], check=True, capture_output=True)
    for _ in range(forwards):
        forward()
    subprocess.run(["callgrind_control", "-i", "off", str(os.getpid())], check=True, capture_output=True)


def _count(mode: str, forwards: int, framework_off: bool) -> tuple[int, int]:
    """(instructions counted, ops of one forward) of one valgrind run."""
    with tempfile.TemporaryDirectory() as folder:
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={Path(folder) / 'out'}", sys.executable, __file__, "--run", mode,
            "--forwards", str(forwards), *(["--framework-off"] if framework_off else []),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
    refs = re.search(r"Collected : (\d+)", result.stderr)
    ops = re.search(r"^ops (\d+)", result.stdout, re.MULTILINE)
    if refs is None or ops is None:
        raise RuntimeError(f"unexpected valgrind output:\n{result.stdout}\n{result.stderr[-2000:]}")
    return int(refs.group(1)), int(ops.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forwards", type=int, default=3)
    parser.add_argument("--framework-off", action="store_true", help="capture with framework=()")
    parser.add_argument("--run", choices=("plain", "captured"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        _measured(args.run, args.forwards, args.framework_off)
        return
    plain, ops = _count("plain", args.forwards, False)
    captured, _ = _count("captured", args.forwards, args.framework_off)
    extra = (captured - plain) / args.forwards
    print("| model | ops | plain M instr/forward | captured M instr/forward | extra k instr/op |")
    print("|---|---|---|---|---|")
    print(f"| resnet18 1x3x64x64 | {ops} | {plain / args.forwards / 1e6:.1f} | "
          f"{captured / args.forwards / 1e6:.1f} | {extra / ops / 1e3:.1f} |")


if __name__ == "__main__":
    main()
