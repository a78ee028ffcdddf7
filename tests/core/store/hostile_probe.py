"""Opens hostile captures the way a user would, in a process of its own, and reports what happened.

Run by ``test_hostile.py`` as ``python -m tests.core.store.hostile_probe CASES.json``. Each case
is opened with ``lens_core`` (``load`` and everything a loaded history offers: every tensor and
gradient, the call stacks' source lines, the text, the graph, the summaries, the anomaly report)
or with the ``lens`` command, under three watches:

- memory: the address space is capped at what the warmed-up process uses plus
  ``HEADROOM`` (``RLIMIT_AS``), so reading without bound fails with MemoryError instead of
  eating the machine, and how far the peak resident size rose past the warmed-up one is reported;
- files: an audit hook records every path opened or listed, so a test can tell that nothing
  outside the capture's folder was read;
- time: each case reports its seconds; a case that hangs is killed by the test, which sees
  its result missing.

Each case prints one line ``RESULT <json>`` as soon as it ends.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

import lens_core as lc
from lens_callbacks.cli.main import main as lens_main
from lens_core import store
from lens_core.graph.model import build_graph

HEADROOM = 1536 * 2**20
"""Bytes of address space a case may add to the warmed-up process (1.5 GiB)."""

_watching: list[str] | None = None
_warm_peak = 0.0
_EVENTS = {"open", "os.listdir", "os.scandir"}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _watching is None or event not in _EVENTS or not args:
        return
    path = args[0]
    if isinstance(path, (str, bytes, os.PathLike)):
        _watching.append(os.path.realpath(os.fsdecode(path)))


def _exercise(path: Path) -> None:
    """Everything a user may do with a loaded capture."""
    history = store.load(path)
    for layer in history:
        _ = layer.tensor_contents, layer.gradient, layer.lookup_keys
        for frame in layer.func_call_stack:
            _ = frame.code_context, frame.code_line
    str(history)
    for vis_opt in ("unrolled", "rolled"):
        build_graph(history, vis_opt)
    lc.explain(history)
    store.load_summaries(path)
    store.load_extra(path)


def _run(case: dict[str, Any]) -> dict[str, Any]:
    global _watching
    out, err = io.StringIO(), io.StringIO()
    result: dict[str, Any] = {"name": case["name"]}
    _watching = opened = []
    started = time.perf_counter()
    try:
        if case["action"] == "load":
            _exercise(Path(case["path"]))
        else:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                result["exit"] = lens_main(case["argv"])
        result["outcome"] = "ok"
    except BaseException as error:  # reported, whatever it is: that is the point
        result["outcome"] = type(error).__name__
        result["message"] = str(error)[:2000]
    finally:
        _watching = None
    result["seconds"] = time.perf_counter() - started
    result["rss_growth_mb"] = _peak_mb() - _warm_peak
    result["opened"] = sorted(set(opened))
    result["stdout"], result["stderr"] = out.getvalue()[:20000], err.getvalue()[:5000]
    return result


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    global _warm_peak
    spec = json.loads(Path(sys.argv[1]).read_text())
    _exercise(Path(spec["warm_up"]))  # imports and caches everything a case will use
    with contextlib.redirect_stdout(io.StringIO()):
        lens_main(["inspect", spec["warm_up"]])
    torch.ones(1000).sum()
    used = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmSize:"))) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (used + HEADROOM, resource.RLIM_INFINITY))
    _warm_peak = _peak_mb()
    sys.addaudithook(_audit)
    for case in spec["cases"]:
        print("RESULT", json.dumps(_run(case)), flush=True)


if __name__ == "__main__":
    main()
