"""Capture overhead in instructions per op, which do not drift as wall-clock time does here.

Runs itself under ``valgrind --tool=callgrind`` once per configuration, with instrumentation
switched on only around ``--forwards`` forwards after two warm-ups, and prints instructions per
forward and each configuration's extra instructions per recorded op over plain forwards:

- ``mechanism``: an empty ``TorchFunctionMode`` and two no-op global module hooks, the floor of
  the interception itself, with no recording at all;
- ``nothing saved``: ``get_model_metadata`` (every op recorded, no output kept);
- ``everything saved``: ``log_forward_pass(layers_to_save="all")``.

Each run takes about two minutes (valgrind runs the interpreter and torch's import
uninstrumented but slowly); two run at a time.

    python benchmarks/instructions_per_op.py [--forwards 3] [--framework-off]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

CONFIGURATIONS = {"plain": "plain", "mechanism": "mechanism", "metadata": "nothing saved",
                  "captured": "everything saved"}


def _measured(mode: str, forwards: int, framework_off: bool) -> None:
    """The part that runs under valgrind: warm up, then count ``forwards`` forwards."""
    import torch
    import torchvision
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
    from torch.overrides import TorchFunctionMode

    import lens_core

    class EmptyMode(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            return func(*args, **(kwargs or {}))

    torch.set_num_threads(1)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    options = {"framework": ()} if framework_off else {}

    def mechanism() -> None:
        handles = [register_module_forward_pre_hook(lambda module, args: None),
                   register_module_forward_hook(lambda module, args, out: None, always_call=True)]
        try:
            with EmptyMode():
                model(x)
        finally:
            for handle in handles:
                handle.remove()

    run = {
        "plain": lambda: model(x),
        "mechanism": mechanism,
        "metadata": lambda: lens_core.get_model_metadata(model, x, **options),
        "captured": lambda: lens_core.log_forward_pass(model, x, layers_to_save="all", **options),
    }[mode]
    with torch.no_grad():
        for _ in range(2):
            run()
        print("ops", len(lens_core.get_model_metadata(model, x)), flush=True)
        subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], check=True, capture_output=True)
        for _ in range(forwards):
            run()
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
    parser.add_argument("--run", choices=tuple(CONFIGURATIONS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        _measured(args.run, args.forwards, args.framework_off)
        return
    with ThreadPoolExecutor(2) as pool:
        counts = dict(zip(CONFIGURATIONS, pool.map(
            lambda mode: _count(mode, args.forwards, args.framework_off), CONFIGURATIONS), strict=True))
    plain, ops = counts["plain"]
    print(f"resnet18 1x3x64x64, {ops} ops, one thread, no_grad, {args.forwards} forwards counted\n")
    print("| configuration | M instr/forward | extra k instr/op |")
    print("|---|---|---|")
    for mode, label in CONFIGURATIONS.items():
        count = counts[mode][0]
        extra = "" if mode == "plain" else f"{(count - plain) / args.forwards / ops / 1e3:.1f}"
        print(f"| {label} | {count / args.forwards / 1e6:.1f} | {extra} |")


if __name__ == "__main__":
    main()
