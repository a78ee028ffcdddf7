"""Opening a hostile capture: each way a capture from elsewhere can attack its reader, probed.

Every case is a real folder on disk, made from a real saved capture and then altered the way a
hostile (or broken) sender would: pickle payloads, FIFOs, links to devices, sparse files that
declare gigabytes, flipped bytes, paths to read in the call stacks, terminal escapes in names,
JSON nested 100,000 deep, fields torch chokes on, references to layers that do not exist. All
cases are opened in one separate process (``hostile_probe``) that caps its address space, times
each case and records every path it opens, so that a hang fails a test instead of blocking it,
and reading without bound fails with MemoryError instead of eating the machine.

Each case must end, quickly, in a ``CaptureFormatError`` naming the capture (or the ``lens``
command's one-line error, exit 2), open nothing outside the case's folder, and print no
control character.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lens_core as lc
from lens_core import store
from lens_core.store.folders import STEP_SUMMARIES, micro_batch_name, step_folder_name
from lens_core.summaries import summarize

ROOT = Path(__file__).resolve().parents[3]
SECONDS = 10.0
"""The most one case may take (the sparse and nested ones are refused before any reading)."""
GROWTH_MB = 100.0
"""The most a case may raise the probe's peak memory (the capture itself is a few kilobytes)."""
_PROBE_TIMEOUT = 120.0


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 8)
        self.second = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (3, 4)
        return self.second(torch.relu(self.first(x)))


def _history() -> lc.ModelHistory:
    torch.manual_seed(0)
    model, x = Net(), torch.randn(3, 4)
    with lc.capture(model, gradients=True) as cap:
        loss = model(x).pow(2).sum()
    loss.backward()
    return cap.history


def _save(history: lc.ModelHistory, folder: Path, step: int = 0) -> Path:
    values = {layer.label: layer.tensor_contents for layer in history if layer.tensor_contents is not None}
    return store.save(history, folder, summaries=summarize(values),
                      extra={"step": step, "stage": "train", "rank": 0})


def _step(run: Path, step: int, history: lc.ModelHistory) -> Path:
    """A step folder as DiskWriter writes one: micro_batch_0/ and the pooled summaries.json."""
    folder = run / step_folder_name(step)
    _save(history, folder / micro_batch_name(0), step)
    summary = summarize({"x": torch.arange(6.0)})["x"].to_dict()
    document = {"step": step, "stage": "train", "rank": 0, "activations": {"linear_1_1": summary},
                "gradients": {}, "parameter_gradients": {"first.weight": summary}}
    (folder / STEP_SUMMARIES).write_text(json.dumps(document))
    return folder


# -- editing saved files -------------------------------------------------------------------------


def _edit_history(folder: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    document = json.loads((folder / "history.json").read_text())
    edit(document)
    (folder / "history.json").write_text(json.dumps(document))


def _replace(path: Path, make: Callable[[Path], object]) -> None:
    """``path`` removed and made again by ``make`` (a FIFO, a link...)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    make(path)


@dataclass(frozen=True)
class _Stored:
    dtype: str
    shape: list[int]
    data: bytes | int
    """The tensor's bytes, or how many bytes of zeros to leave as a hole (a sparse file)."""


def _read_tensor_file(path: Path) -> tuple[dict[str, str], dict[str, _Stored]]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    metadata = header.pop("__metadata__")
    start = 8 + length
    tensors = {key: _Stored(spec["dtype"], spec["shape"],
                            raw[start + spec["data_offsets"][0]:start + spec["data_offsets"][1]])
               for key, spec in header.items()}
    return metadata, tensors


def _write_tensor_file(path: Path, metadata: dict[str, str], tensors: dict[str, _Stored],
                       header_text: bytes | None = None) -> None:
    """A safetensors file written byte by byte; holes for the tensors given as sizes."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, stored in tensors.items():
        size = stored.data if isinstance(stored.data, int) else len(stored.data)
        header[key] = {"dtype": stored.dtype, "shape": stored.shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = header_text if header_text is not None else json.dumps(header).encode()
    with path.open("wb") as file:
        file.write(struct.pack("<Q", len(text)) + text)
        for stored in tensors.values():
            if isinstance(stored.data, int):
                file.seek(stored.data, os.SEEK_CUR)
            else:
                file.write(stored.data)
        file.truncate()


def _declare(folder: Path, key: str, shape: list[int], in_history: bool) -> None:
    """Tensor ``key`` declared with ``shape`` in tensors.safetensors, its bytes a hole; and in
    history.json too if ``in_history``."""
    metadata, tensors = _read_tensor_file(folder / "tensors.safetensors")
    count = 1
    for size in shape:
        count *= size
    tensors[key] = _Stored(tensors[key].dtype, shape, count * 4)
    _write_tensor_file(folder / "tensors.safetensors", metadata, tensors)
    if in_history:
        _edit_history(folder, lambda d: next(layer for layer in d["layers"] if layer["label"] == key)
                      .__setitem__("shape", shape))


def _rename_layer(folder: Path, label: str, layer_type: str) -> None:
    """Layer ``label`` made a ``layer_type`` layer, consistently in every file that names it."""
    document = json.loads((folder / "history.json").read_text())
    layer = next(layer for layer in document["layers"] if layer["label"] == label)
    new = f"{layer_type}_{layer['type_index']}_{layer['layer_index']}"
    layer["layer_type"] = layer_type

    def renamed(value: Any) -> Any:
        if isinstance(value, str):
            return {label: new, f"grad/{label}": f"grad/{new}"}.get(value, value)
        if isinstance(value, list):
            return [renamed(item) for item in value]
        if isinstance(value, dict):
            return {renamed(key): renamed(item) for key, item in value.items()}
        return value

    (folder / "history.json").write_text(json.dumps(renamed(document)))
    summaries = json.loads((folder / "summaries.json").read_text())
    (folder / "summaries.json").write_text(json.dumps(renamed(summaries)))
    metadata, tensors = _read_tensor_file(folder / "tensors.safetensors")
    _write_tensor_file(folder / "tensors.safetensors", metadata, renamed(tensors))


class _Payload:
    """Unpickling this creates ``marker``: proof that a loader ran the sender's code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


# -- the cases -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One hostile folder and how it is opened."""

    make: Callable[[Path], object]
    """Alters the copy of a good capture (``micro_batch_0`` of ``step_000000`` in a run) it is given."""
    open_with: str = "load"
    """``load`` (lens_core, all of it), or a ``lens`` command: inspect, graph, list, inspect-step."""
    outcome: str = "CaptureFormatError"
    """What must come out: CaptureFormatError, or ok (a capture that loads, then fails on use)."""
    match: str = ""
    """Text the error must contain."""


def _pickle_history(folder: Path) -> None:
    (folder / "history.json").write_bytes(pickle.dumps(_Payload(folder.parent / "PWNED")))


def _pickle_tensors(folder: Path) -> None:
    (folder / "tensors.safetensors").write_bytes(pickle.dumps({"x": _Payload(folder.parent / "PWNED")}))


def _key_is_a_path(folder: Path) -> None:
    metadata, tensors = _read_tensor_file(folder / "tensors.safetensors")
    tensors["../../etc/passwd"] = _Stored("F32", [1], b"\0\0\0\0")
    _write_tensor_file(folder / "tensors.safetensors", metadata, tensors)


def _fifo(name: str) -> Callable[[Path], object]:
    return lambda folder: _replace(folder / name, os.mkfifo)


def _link(name: str, target: str) -> Callable[[Path], object]:
    return lambda folder: _replace(folder / name, lambda path: path.symlink_to(target))


def _huge_json(folder: Path) -> None:
    with (folder / "history.json").open("r+b") as file:
        file.truncate(300 * 2**20)  # sparse: 300 MB that take no disk


def _dense_json(folder: Path) -> None:
    """60 MB that json would make 1.5 GB of empty lists."""
    (folder / "history.json").write_bytes(b"[" + b"[]," * 20_000_000 + b"[]]")


def _nested(name: str) -> Callable[[Path], object]:
    return lambda folder: (folder / name).write_text("[" * 100_000 + "]" * 100_000)


def _nested_header(folder: Path) -> None:
    metadata, tensors = _read_tensor_file(folder / "tensors.safetensors")
    _write_tensor_file(folder / "tensors.safetensors", metadata, tensors, b"[" * 100_000 + b"]" * 100_000)


def _flip(folder: Path) -> None:
    data = bytearray((folder / "tensors.safetensors").read_bytes())
    data[-3] ^= 0x10  # one bit of the last tensor's last value
    (folder / "tensors.safetensors").write_bytes(bytes(data))


def _stacks(folder: Path) -> None:
    fifo = folder.parent / "source.fifo"
    os.mkfifo(fifo)
    stack = [["/etc/passwd", 1, "passwd"], [str(fifo), 1, "fifo"], ["/dev/zero", 3, "zero"]]

    def edit(document: dict[str, Any]) -> None:
        for layer in document["layers"]:
            layer["func_call_stack"] = stack
        document["code_context"] = []

    _edit_history(folder, edit)


Where = Callable[[dict[str, Any]], dict[str, Any]]


def _set(where: Where, field: str, value: Any) -> Callable[[Path], object]:
    return lambda folder: _edit_history(folder, lambda d: where(d).__setitem__(field, value))


def _layer(index: int) -> Where:
    return lambda document: document["layers"][index]


def _deep_modules(folder: Path) -> None:
    """Two layers in 10,000 nested module calls: the graph would recurse through all of them."""
    stack = [f"m{i}:1" for i in range(10_000)]
    _edit_history(folder, lambda d: [d["layers"][i].__setitem__("module_stack", stack) for i in (1, 2)])


def _duplicate(folder: Path) -> None:
    _edit_history(folder, lambda d: d["layers"][2].__setitem__("label", d["layers"][1]["label"]))


def _escapes(folder: Path) -> None:
    _rename_layer(folder, "relu_1_2", "relu\x1b]0;pwned\x07\x1b[2J\nFORGED")
    _edit_history(folder, lambda d: d["model"].__setitem__("model_name", "Net\x1b[31m\r\nFORGED \u202e"))


def _link_to_root(folder: Path) -> None:
    _replace(folder, lambda path: path.symlink_to("/"))


def _without_summaries(make: Callable[[Path], object]) -> Callable[[Path], object]:
    """``make``, then no saved summaries: ``lens inspect`` must read the tensors for its statistics."""
    return lambda folder: (make(folder), (folder / "summaries.json").write_text("{}"))


def _step_file(make: Callable[[Path], object]) -> Callable[[Path], object]:
    """Applies ``make`` to the step folder instead of its micro-batch."""
    return lambda folder: make(folder.parent)


CASES: dict[str, Case] = {
    "pickle payload as history.json": Case(_pickle_history, match="not UTF-8"),
    "pickle payload as tensors.safetensors": Case(_pickle_tensors, match="tensors.safetensors"),
    "tensor key ../../etc/passwd": Case(_key_is_a_path, match="does not declare ('../../etc/passwd')"),
    "history.json is a FIFO": Case(_fifo("history.json"), match="FIFO"),
    "summaries.json is a FIFO": Case(_fifo("summaries.json"), match="FIFO"),
    "tensors.safetensors is a FIFO": Case(_fifo("tensors.safetensors"), match="FIFO"),
    "history.json links to /dev/zero": Case(_link("history.json", "/dev/zero"), match="symbolic link"),
    "summaries.json links to /dev/urandom": Case(_link("summaries.json", "/dev/urandom"),
                                                 match="symbolic link"),
    "tensors.safetensors links to /dev/zero": Case(_link("tensors.safetensors", "/dev/zero"),
                                                   match="symbolic link"),
    "history.json links to /etc/passwd": Case(_link("history.json", "/etc/passwd"), match="symbolic link"),
    "history.json is a folder": Case(lambda f: _replace(f / "history.json", Path.mkdir), match="is a folder"),
    "history.json of 300 MB": Case(_huge_json, match="more than the 268,435,456"),
    "2^30 float32 declared in tensors.safetensors only": Case(
        lambda f: _declare(f, "linear_1_1", [2**30], in_history=False), match="where history.json declares"),
    "64 GB declared in both files": Case(lambda f: _declare(f, "input_1_0", [2**34], in_history=True),
                                         match="more memory than this process can allocate"),
    "a flipped bit in a tensor": Case(_flip, match="do not match their SHA-256"),
    "call stacks name /etc/passwd, a FIFO, /dev/zero": Case(_stacks, outcome="ok"),
    "history.json of 60 MB of [],[],...": Case(_dense_json, match="JSON values, more than the 32,000,000"),
    "100k nested [ as history.json": Case(_nested("history.json"), match="nests lists"),
    "100k nested [ as summaries.json": Case(_nested("summaries.json"), match="nests lists"),
    "100k nested [ as the tensor header": Case(_nested_header, match="nests lists"),
    "device bogus": Case(_set(_layer(1), "device", "bogus"), match="'bogus'"),
    "parents label that does not exist": Case(_set(_layer(2), "parents", ["nothing_9_9"]),
                                              match="nothing_9_9"),
    "duplicate label": Case(_duplicate, match="labelled 'linear_1_1'"),
    "shape of 10^30": Case(_set(_layer(1), "shape", [10**30]), match="2**63"),
    "index not its position": Case(_set(_layer(1), "index", 7), match="index 7"),
    "module calls nested 10,000 deep": Case(_deep_modules, match="more than 256 module calls"),
    "module call not address:call": Case(_set(_layer(1), "module_stack", ["first"]), match="'first'"),
    "lens graph, module calls nested 10,000 deep": Case(_deep_modules, open_with="graph",
                                                        match="more than 256 module calls"),
    "lens graph, parents label that does not exist": Case(
        _set(_layer(2), "parents", ["nothing_9_9"]), open_with="graph", match="nothing_9_9"),
    "lens inspect, 2^30 float32 declared in the tensor file only": Case(
        lambda f: _declare(f, "linear_1_1", [2**30], in_history=False), open_with="inspect",
        match="where history.json declares"),
    "lens inspect, 64 GB declared in both files": Case(
        _without_summaries(lambda f: _declare(f, "input_1_0", [2**34], in_history=True)),
        open_with="inspect", match="more memory than this process can allocate"),
    "lens inspect, escapes in labels and model name": Case(_escapes, open_with="inspect", outcome="ok"),
    "lens inspect, step summaries.json is a FIFO": Case(_step_file(_fifo(STEP_SUMMARIES)),
                                                        open_with="inspect-step", match="FIFO"),
    "lens inspect, 100k nested [ in step summaries.json": Case(
        _step_file(_nested(STEP_SUMMARIES)), open_with="inspect-step", match="nests lists"),
    "lens inspect, micro_batch_0 links to /": Case(_link_to_root, open_with="inspect-step",
                                                   match="symbolic link"),
    "load of a step whose micro_batch_0 links to /": Case(_link_to_root, open_with="load-step",
                                                          match="symbolic link"),
}


def _break_run(run: Path, history: lc.ModelHistory) -> dict[str, str]:
    """A run of one good step and one step for each way a capture breaks; label -> step folder."""
    _step(run, 0, history)
    broken = {}
    for step, (name, case) in enumerate(((n, c) for n, c in CASES.items() if c.open_with == "load"), 1):
        folder = _step(run, step, history)
        case.make(folder / micro_batch_name(0))
        broken[name] = folder.name
    (run / step_folder_name(999)).symlink_to("/")  # a linked step is no step: never walked
    return broken


@dataclass(frozen=True)
class Probed:
    results: dict[str, dict[str, Any]]
    folders: dict[str, Path]
    run: Path
    run_steps: dict[str, str]


def _probe(spec: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    """Runs the probe over ``spec``'s cases; a case that does not end is reported as ``hung``."""
    results: list[dict[str, Any]] = []
    cases = list(spec["cases"])
    while cases:
        (work / "cases.json").write_text(json.dumps({**spec, "cases": cases}))
        try:
            command = [sys.executable, "-m", "tests.core.store.hostile_probe", str(work / "cases.json")]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=_PROBE_TIMEOUT,
                                  check=False)
            stdout, ended = done.stdout, True
        except subprocess.TimeoutExpired as timeout:
            stdout = timeout.stdout.decode() if isinstance(timeout.stdout, bytes) else (timeout.stdout or "")
            ended = False
        found = [json.loads(line.removeprefix("RESULT ")) for line in stdout.splitlines()
                 if line.startswith("RESULT ")]
        results += found
        cases = cases[len(found):]
        if cases:  # the probe hung or died on this case: record it, go on with the others
            results.append({"name": cases[0]["name"], "outcome": "hung" if not ended else "died",
                            "message": "" if not ended else done.stderr[-3000:]})
            cases = cases[1:]
    return results


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> Probed:
    base = tmp_path_factory.mktemp("hostile")
    history = _history()
    folders: dict[str, Path] = {}
    cases = []
    for number, (name, case) in enumerate(CASES.items()):
        step = _step(base / f"case_{number}", 0, history)
        capture = step / micro_batch_name(0)
        case.make(capture)
        folders[name] = capture
        target = step if case.open_with in ("inspect-step", "load-step") else capture
        argv = {"inspect": ["inspect", str(target)], "inspect-step": ["inspect", str(target)],
                "graph": ["graph", str(target), "-o", str(base / f"graph_{number}.svg")]}.get(case.open_with)
        cases.append({"name": name, "action": "load" if argv is None else "cli", "path": str(target),
                      "argv": argv})
    run = base / "run"
    run_steps = _break_run(run, history)
    cases.append({"name": "lens list of the whole run", "action": "cli", "argv": ["list", str(run)]})
    warm_up = _save(history, base / "warm_up")
    results = _probe({"warm_up": str(warm_up), "cases": cases}, base)
    return Probed({result["name"]: result for result in results}, folders, run, run_steps)


def _within(path: str, folder: Path) -> bool:
    return Path(path).is_relative_to(folder.resolve())


def _check_common(result: dict[str, Any], folder: Path) -> None:
    """No hang, no time, nothing opened outside ``folder``, nothing a terminal would obey."""
    assert result["outcome"] not in ("hung", "died"), result
    assert result["seconds"] < SECONDS, result
    assert result["rss_growth_mb"] < GROWTH_MB, result
    outside = [path for path in result["opened"] if not _within(path, folder)]
    assert outside == [], result["name"]
    for text in (result["stdout"], result["stderr"]):
        assert not any(char != "\n" and not char.isprintable() for char in text), text


@pytest.mark.parametrize("name", CASES)
def test_a_hostile_capture_is_refused_clearly(probed: Probed, name: str) -> None:
    case, result, folder = CASES[name], probed.results[name], probed.folders[name]
    _check_common(result, folder.parent.parent)
    assert not (folder.parent / "PWNED").exists()
    if case.open_with in ("load", "load-step"):
        assert result["outcome"] == case.outcome, result
        if case.outcome != "ok":
            assert str(folder.parent) in result["message"]
            assert case.match in result["message"], result["message"]
        return
    assert result["outcome"] == "ok", result  # the command itself never raises
    if case.outcome == "ok":
        assert result["exit"] == 0, result
        return
    assert result["exit"] == 2, result
    (line,) = result["stderr"].splitlines()  # one line, no traceback
    assert line.startswith(f"lens {case.open_with.removesuffix('-step')}: error: {folder.parent}"), line
    assert case.match in line, line


def test_escapes_in_labels_and_names_are_shown_not_obeyed(probed: Probed) -> None:
    result = probed.results["lens inspect, escapes in labels and model name"]
    out = result["stdout"]
    assert "\x1b" not in out
    assert "\r" not in out
    assert not any(line.startswith("FORGED") for line in out.splitlines())
    assert "Net\\x1b[31m\\x0d\\x0aFORGED \\u202e" in out
    assert "relu\\x1b]0;pwned\\x07\\x1b[2J\\x0aFORGED_1_2" in out


def test_source_lines_come_from_the_capture_never_from_the_paths_it_names(probed: Probed) -> None:
    result = probed.results["call stacks name /etc/passwd, a FIFO, /dev/zero"]
    assert result["outcome"] == "ok"
    named = ("/etc/passwd", "/dev/zero")
    assert [path for path in result["opened"] if path in named or path.endswith(".fifo")] == []
    loaded = store.load(probed.folders["call stacks name /etc/passwd, a FIFO, /dev/zero"])
    frame = loaded[1].func_call_stack[0]
    assert frame.call_fname == "/etc/passwd"
    assert frame.code_context == []
    assert frame.code_line == ""


def test_lens_list_of_a_run_of_hostile_steps_lists_them_all(probed: Probed) -> None:
    result = probed.results["lens list of the whole run"]
    _check_common(result, probed.run)
    assert result["exit"] == 0, result
    rows = result["stdout"].split("captures cannot be read completely:")[0]
    assert len([line for line in rows.splitlines() if "step_" in line]) == 1 + len(probed.run_steps)
    problems = result["stdout"].split("cannot be read completely:")[1]
    unreadable = {name for name, folder in probed.run_steps.items() if folder in problems}
    # each broken step is reported, except those whose damage shows only when a tensor is read
    assert set(probed.run_steps) - unreadable == {
        "summaries.json is a FIFO", "summaries.json links to /dev/urandom", "64 GB declared in both files",
        "a flipped bit in a tensor", "call stacks name /etc/passwd, a FIFO, /dev/zero",
        "100k nested [ as summaries.json",
    }
    assert "step_000999" not in result["stdout"]


def test_every_case_ends_in_the_expected_way_counted(probed: Probed) -> None:
    """The counts the README quotes: cases tried, clear errors, nothing hung or read outside."""
    results = list(probed.results.values())
    assert len(results) == len(CASES) + 1
    assert not [r for r in results if r["outcome"] in ("hung", "died", "MemoryError", "RecursionError")]


# -- the same rules, in this process ----------------------------------------------------------------


def test_source_lines_are_stored_at_save_and_shown_after_loading(tmp_path: Path) -> None:
    history = _history()
    loaded = store.load(_save(history, tmp_path / "capture"))
    for before, after in zip(history, loaded, strict=True):
        assert after.func_call_stack == before.func_call_stack  # same files, lines, functions
        for live, stored in zip(before.func_call_stack, after.func_call_stack, strict=True):
            assert stored.stored_context is not None
            assert stored.code_context == live.code_context
            assert stored.code_line == live.code_line
    relu = loaded["relu_1_2"].func_call_stack[-1]
    assert "torch.relu(self.first(x))" in relu.code_line


def test_a_capture_saved_before_digests_and_source_lines_loads_without_them(tmp_path: Path) -> None:
    folder = _save(_history(), tmp_path / "capture")
    _edit_history(folder, lambda d: (d.pop("tensor_sha256"), d.pop("code_context")))
    _flip(folder)
    loaded = store.load(folder)
    assert all(frame.code_context == [] for layer in loaded for frame in layer.func_call_stack)
    # one bit flipped, and nothing can tell: no digest to check it against
    assert all(layer.tensor_contents is not None for layer in loaded)
    assert all(layer.gradient is not None for layer in loaded if layer.gradient_slot is not None)


def test_save_refuses_extra_nested_deeper_than_load_reads(tmp_path: Path) -> None:
    deep: Any = "bottom"
    for _ in range(63):
        deep = [deep]
    with pytest.raises(ValueError, match="extra nests lists and dicts more than 63 levels"):
        store.save(_history(), tmp_path / "deep", extra={"x": deep})
    assert not (tmp_path / "deep").exists()
    store.save(_history(), tmp_path / "fits", extra={"x": deep[0]})
    assert store.load_extra(tmp_path / "fits")["x"] == deep[0]


def test_folder_names_match_whole_in_ascii_digits(tmp_path: Path) -> None:
    from lens_core.store.folders import is_step_name, micro_batch_index, step_folders

    assert is_step_name("step_000100")
    assert not is_step_name("step_000100\n")
    assert not is_step_name("step_\u0661\u0662")  # Arabic-Indic digits
    assert micro_batch_index("micro_batch_1\n") is None
    for name in ("step_000001", "step_000002\nFORGED"):
        (tmp_path / name).mkdir()
    (tmp_path / "step_000003").symlink_to(tmp_path / "step_000001")
    assert [found.path.name for found in step_folders(tmp_path)] == ["step_000001"]


def test_a_step_summaries_file_is_read_as_a_capture_file_is(tmp_path: Path) -> None:
    from lens_core.store.folders import read_step_summaries

    step = _step(tmp_path, 0, _history())
    summaries = read_step_summaries(step)
    assert summaries is not None
    assert summaries["step"] == 0
    (step / STEP_SUMMARIES).unlink()
    assert read_step_summaries(step) is None
    (step / STEP_SUMMARIES).symlink_to("/dev/zero")
    with pytest.raises(lc.CaptureFormatError, match="symbolic link"):
        read_step_summaries(step)
    _replace(step / STEP_SUMMARIES, lambda path: path.write_text("[1, 2]"))
    with pytest.raises(lc.CaptureFormatError, match="not the summaries of a step"):
        read_step_summaries(step)


def test_a_graph_of_a_history_changed_by_hand_names_the_bad_label() -> None:
    from lens_core.graph.model import build_graph

    history = _history()
    history.layer_list[2].parents = ("nothing_9_9",)
    with pytest.raises(ValueError, match="names the parent 'nothing_9_9'"):
        build_graph(history)
    history = _history()
    history.layer_list[2].label = history.layer_list[1].label
    with pytest.raises(ValueError, match="both labelled 'linear_1_1'"):
        build_graph(history)


class Log(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.fc(x))  # NaN wherever fc gives a negative value


def test_explain_of_a_loaded_capture_quotes_the_stored_line_not_the_file_named(tmp_path: Path) -> None:
    torch.manual_seed(0)
    folder = store.save(lc.log_forward_pass(Log(), torch.randn(3, 4), layers_to_save="all"), tmp_path / "nan")

    def elsewhere(document: dict[str, Any]) -> None:  # every frame said to be in /etc/passwd
        for layer in document["layers"]:
            for frame in layer["func_call_stack"]:
                frame[0] = "/etc/passwd"
        for entry in document["code_context"]:
            entry[0] = "/etc/passwd"

    _edit_history(folder, elsewhere)
    report = lc.explain(store.load(folder))
    assert report is not None
    assert report.file == "/etc/passwd"
    assert "torch.log(self.fc(x))" in report.code  # the line stored with the capture
