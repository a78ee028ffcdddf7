"""``lens findings RUN`` and ``lens report RUN -o report.html`` on run folders a DiskWriter wrote."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lens_callbacks.cli import main
from lens_callbacks.findings import find, load_run
from tests.callbacks.findings import runs
from tests.conftest import require

REPO = Path(__file__).resolve().parents[3]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def sigmoid_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, runs.Run]:
    folder = tmp_path_factory.mktemp("sigmoid") / "lens"
    return folder, runs.deep_sigmoid_mlp(log_dir=folder)


def test_a_run_folder_gives_the_findings_seen_live(sigmoid_run: tuple[Path, runs.Run]) -> None:
    folder, run = sigmoid_run
    steps = load_run(folder)
    assert [s.step for s in steps] == [0, 2, 4, 6]
    assert [s.previous_step for s in steps] == [None, 0, 2, 4]
    assert steps[-1].layers["sigmoid_1_2"].layer_type == "sigmoid"
    assert [f.to_dict() for f in find(steps)] == [f.to_dict() for f in run.findings]  # no update ratio here


def test_lens_findings_prints_each_finding_with_layers_and_steps(
    sigmoid_run: tuple[Path, runs.Run], capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _ = sigmoid_run
    assert main(["findings", str(folder)]) == 0
    out = capsys.readouterr().out
    first = f"1 finding(s) in {folder} (4 captured step(s): 0 ... 6), most severe first:"
    assert out.splitlines()[0] == first
    assert "WARNING vanishing_gradients  since step 0  (steps 0, 2, 4, 6)" in out
    assert "layers: linear_1_1, linear_2_3" in out

    assert main(["findings", str(folder), "--json"]) == 0
    (found,) = json.loads(capsys.readouterr().out)
    assert (found["rule"], found["severity"], found["since"]) == ("vanishing_gradients", "warning", 0)


def test_lens_findings_on_a_healthy_run_and_on_bad_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs.healthy_cnn(steps=20, every=5, log_dir=tmp_path / "cnn")
    assert main(["findings", str(tmp_path / "cnn")]) == 0
    assert capsys.readouterr().out == f"No findings in {tmp_path / 'cnn'} (4 captured step(s): 0 ... 15).\n"

    (tmp_path / "empty").mkdir()
    assert main(["findings", str(tmp_path / "empty")]) == 2
    assert "holds no finished training step" in capsys.readouterr().err
    assert main(["findings", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "cnn"), "-o", str(tmp_path / "report.pdf")]) == 2
    assert "name it" in capsys.readouterr().err


def test_lens_report_is_one_offline_page_that_chromium_renders_without_errors(
    sigmoid_run: tuple[Path, runs.Run], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    folder, _ = sigmoid_run
    page = tmp_path / "report.html"
    assert main(["report", str(folder), "-o", str(page)]) == 0
    assert capsys.readouterr().out == f"wrote {page}\n"
    text = page.read_text()
    assert "<script" not in text
    assert not re.search(r"""(src|href)=["']https?:""", text)  # nothing to fetch
    assert text.count("<svg") >= 2 + (shutil.which("dot") is not None)  # heatmap, lines (and the graph)
    assert "vanishing_gradients" in text
    assert "Gradient flow" in text
    if shutil.which("dot"):
        assert 'stroke="#d62728"' in text  # the flagged layers are outlined in the graph

    require(Path(CHROMIUM).exists(), "no chromium (Debian package chromium: apt-get install chromium)")
    screenshot = tmp_path / "findings_report.png"
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}",
         "--enable-logging=stderr", "--v=0", f"--screenshot={screenshot}", "--window-size=1280,2000",
         "--virtual-time-budget=5000", page.as_uri()],
        check=True, timeout=90, capture_output=True, text=True,
    )
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], console  # no script error, no resource that failed to load
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    artifact = REPO / "out" / "test-artifacts" / "findings_report.png"
    artifact.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(screenshot, artifact)
    from PIL import Image

    with Image.open(screenshot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50, "the page is blank"
