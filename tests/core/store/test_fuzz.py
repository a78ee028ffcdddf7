"""Fuzzing the folder format: a real capture's files mutated by hypothesis, then opened.

Each example copies a saved capture (tensors, gradients, summaries, extra), mutates it (flipped
bytes, a file cut short, a JSON value replaced by any other JSON value or swapped with another,
a field removed, in ``history.json``, ``summaries.json`` or the header of
``tensors.safetensors``) and opens it the way users do: ``lens_core.load`` and everything a
loaded history offers, then ``lens inspect``. The only failure allowed is a
``CaptureFormatError`` (exit 2 with one line of text for the command); anything else that
escapes (KeyError, RecursionError, OverflowError, MemoryError, torch's RuntimeError...) is a bug
hypothesis shrinks to a minimal capture. ``LENS_FUZZ_EXAMPLES`` sets how many examples run (the
README's counts come from a long run).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lens_callbacks.cli.main import main as lens_main
from lens_core import store
from lens_core.checks.forensics import explain
from lens_core.graph.model import build_graph
from lens_core.store import CaptureFormatError
from tests.conftest import require
from tests.core.store.test_hostile import _history, _save

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # a dev dependency; require() below says so
    st = None

EXAMPLES = int(os.environ.get("LENS_FUZZ_EXAMPLES", "300"))
FILES = ("history.json", "summaries.json", "tensors.safetensors")
OUTCOMES: Counter[str] = Counter()
"""What each example came to, for the counts printed at the end (``pytest -s``)."""

Mutation = Callable[[dict[str, bytes]], None]


def _json_values() -> Any:
    """Any JSON value, biased to the ones that break readers: huge, negative, control characters."""
    scalars = st.one_of(
        st.none(), st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, -1, 2**31, 2**63, 10**400]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12), st.sampled_from(["../../etc/passwd", "/dev/zero", "\x1b[2J", "bogus", "cpu",
                                               "float32", "F32", "linear_1_1", "first:1", ""]),
    )
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=8), inner, max_size=4), max_leaves=8)


def _walk(document: Any, path: list[int]) -> tuple[Any, Any] | None:
    """The container and key ``path`` leads to (each step picks a child by position), or None."""
    parent, key = None, None
    node = document
    for step in path:
        if isinstance(node, dict) and node:
            parent, key = node, list(node)[step % len(node)]
        elif isinstance(node, list) and node:
            parent, key = node, step % len(node)
        else:
            break
        node = parent[key]
    return None if parent is None else (parent, key)


def _header(raw: bytes) -> tuple[Any, bytes] | None:
    if len(raw) < 8:
        return None
    (length,) = struct.unpack("<Q", raw[:8])
    try:
        return json.loads(raw[8:8 + length]), raw[8 + length:]
    except ValueError:
        return None


def _json_edit(name: str, edit: Callable[[Any], None]) -> Mutation:
    def mutate(files: dict[str, bytes]) -> None:
        if name == "tensors.safetensors":
            found = _header(files[name])
            if found is None:
                return
            header, data = found
            edit(header)
            text = json.dumps(header).encode()
            files[name] = struct.pack("<Q", len(text)) + text + data
        else:
            try:
                document = json.loads(files[name])
            except ValueError:  # an earlier mutation broke it
                return
            edit(document)
            files[name] = json.dumps(document).encode()
    return mutate


def _replace(path: list[int], value: Any) -> Callable[[Any], None]:
    def edit(document: Any) -> None:
        found = _walk(document, path)
        if found is not None:
            found[0][found[1]] = value
    return edit


def _swap(first: list[int], second: list[int]) -> Callable[[Any], None]:
    def edit(document: Any) -> None:
        a, b = _walk(document, first), _walk(document, second)
        if a is not None and b is not None:
            a[0][a[1]], b[0][b[1]] = b[0][b[1]], a[0][a[1]]
    return edit


def _remove(path: list[int]) -> Callable[[Any], None]:
    def edit(document: Any) -> None:
        found = _walk(document, path)
        if found is not None:
            del found[0][found[1]]
    return edit


def _flip(name: str, flips: list[tuple[int, int]]) -> Mutation:
    def mutate(files: dict[str, bytes]) -> None:
        data = bytearray(files[name])
        for position, mask in flips:
            if data:
                data[position % len(data)] ^= mask
        files[name] = bytes(data)
    return mutate


def _cut(name: str, keep: float) -> Mutation:
    def mutate(files: dict[str, bytes]) -> None:
        files[name] = files[name][:int(len(files[name]) * keep)]
    return mutate


def _mutations() -> Any:
    paths = st.lists(st.integers(min_value=0, max_value=2**16), min_size=1, max_size=7)
    names = st.sampled_from(FILES)
    edits = st.one_of(
        st.builds(_replace, paths, _json_values()),
        st.builds(_swap, paths, paths),
        st.builds(_remove, paths),
    )
    one = st.one_of(
        st.builds(_json_edit, names, edits),
        st.builds(_json_edit, st.just("history.json"), edits),  # the richest file, fuzzed most
        st.builds(_flip, names, st.lists(st.tuples(st.integers(min_value=0), st.integers(1, 255)),
                                         min_size=1, max_size=6)),
        st.builds(_cut, names, st.floats(min_value=0, max_value=1, exclude_max=True)),
    )
    return st.lists(one, min_size=1, max_size=3)


def _use(folder: Path) -> str:
    """Opens ``folder`` every way a user would; what it came to."""
    try:
        history = store.load(folder)
    except CaptureFormatError:
        return "refused by load"
    try:
        for layer in history:
            _ = layer.tensor_contents, layer.gradient, layer.lookup_keys
            for frame in layer.func_call_stack:
                _ = frame.code_context, frame.code_line
        store.load_summaries(folder)
    except CaptureFormatError:
        return "loaded, refused on use"
    store.load_extra(folder)
    str(history)
    for vis_opt in ("unrolled", "rolled"):
        build_graph(history, vis_opt)
    explain(history)
    return "loaded and used"


def _inspect(folder: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = lens_main(["inspect", str(folder)])
    assert status in (0, 2)
    if status == 2:
        assert len(err.getvalue().splitlines()) == 1, err.getvalue()
    for text in (out.getvalue(), err.getvalue()):
        assert not any(char != "\n" and not char.isprintable() for char in text)


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = _save(_history(), tmp_path_factory.mktemp("fuzz") / "capture")
    return {name: (folder / name).read_bytes() for name in FILES}


def test_a_mutated_capture_loads_or_is_refused_clearly(original: dict[str, bytes]) -> None:
    require(st is not None, "hypothesis is not installed (pip install hypothesis)")

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_mutations())
    def check(mutations: list[Mutation]) -> None:
        files = dict(original)
        for mutate in mutations:
            mutate(files)
        with tempfile.TemporaryDirectory() as work:
            folder = Path(work) / "capture"
            folder.mkdir()
            for name, data in files.items():
                (folder / name).write_bytes(data)
            outcome = _use(folder)
            _inspect(folder)
            shutil.rmtree(folder)
        OUTCOMES[outcome] += 1

    check()
    print(f"\nfuzzed captures: {sum(OUTCOMES.values())}: {dict(OUTCOMES)}")
