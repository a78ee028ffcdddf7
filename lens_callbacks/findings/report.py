"""``lens report``: one self-contained HTML page of a run's health, readable offline.

The page holds the findings, a gradient-flow heatmap (layers x captured steps), the activation
and gradient statistics of each layer over the steps, the graph of the last capture with the
layers that have findings marked, and the rules with their thresholds and sources. Plots are
drawn with matplotlib (``pip install "lens-callbacks[report]"``) and embedded as inline SVG,
the graph is rendered by graphviz's ``dot`` when it is installed: the page loads nothing from
anywhere, so it can be mailed or attached to an issue.
"""

from __future__ import annotations

import html
import io
import math
import os
import shutil
import subprocess
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lens_callbacks.findings.finding import Finding
from lens_callbacks.findings.rules import DEFAULT_RULES, Rule, find
from lens_callbacks.findings.snapshot import StepSummaries, load_run
from lens_core import ModelHistory, store
from lens_core.graph.model import build_graph
from lens_core.graph.render import _dot_ids, digraph_of
from lens_core.store.folders import step_folders
from lens_core.summaries import TensorSummary

__all__ = ["render_report", "write_report"]

_INSTALL_HINT = 'pip install "lens-callbacks[report]" (or pip install matplotlib)'
# Layers drawn as lines in the statistics plots, at most (those with findings first).
_MAX_LINES = 24
# Seconds dot may take for the graph of the last capture before the page goes without it.
_DOT_TIMEOUT = 60.0
_MARK = "#d62728"

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; width: 100%; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
tr.error td:first-child { color: #fff; background: #d62728; font-weight: bold; }
tr.warning td:first-child { background: #ffbf47; font-weight: bold; }
.figure svg { max-width: 100%; height: auto; }
.graph { overflow: auto; max-height: 900px; border: 1px solid #ddd; }
.note { color: #666; }
code { background: #f4f4f4; padding: 0 3px; }
"""


def _matplotlib() -> Any:
    try:
        import matplotlib  # noqa: PLC0415  # optional dependency

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError as error:
        raise ImportError(f"lens report draws its plots with matplotlib: {_INSTALL_HINT}.") from error
    return Figure


def render_report(run: str | os.PathLike[str], *, rules: Sequence[Rule] = DEFAULT_RULES) -> str:
    """The HTML page of a run folder a ``DiskWriter`` wrote (see the module docstring).

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: ``run`` holds no finished training step.
    """
    figure = _matplotlib()
    steps = load_run(run)
    findings = find(steps, rules)
    flagged = {layer for finding in findings for layer in finding.layers}
    labels = _layer_order(steps)
    parts = [
        f"<h1>Training health: {html.escape(str(run))}</h1>",
        f"<p>{len(steps)} captured training step(s), {_range(steps)}; {len(labels)} layers with statistics; "
        f"{len(findings)} finding(s). Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by "
        "<code>lens report</code>.</p>",
        "<h2>Findings</h2>", _findings_table(findings),
        "<h2>Gradient flow</h2>",
        "<p>log10 of the RMS of the gradient of each layer's output, per captured step. Layers with findings "
        "are marked in red.</p>",
        _figure(_heatmap(figure, steps, labels, flagged)),
        "<h2>Statistics over the captured steps</h2>",
        "<p>Activation std and gradient RMS of each layer (log scale); layers with findings drawn thick, "
        f"at most {_MAX_LINES} layers.</p>",
        _figure(_lines(figure, steps, labels, flagged)),
        "<h2>Graph of the last capture</h2>",
        _graph(run, steps[-1].step, flagged),
        "<h2>Rules</h2>", _rules_table(rules),
    ]
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>lens report: "
            f"{html.escape(str(run))}</title><style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _range(steps: Sequence[StepSummaries]) -> str:
    return f"step {steps[0].step}" if len(steps) == 1 else f"steps {steps[0].step} to {steps[-1].step}"


def _layer_order(steps: Sequence[StepSummaries]) -> list[str]:
    """Labels with a gradient or activation summary, in execution order (the last step's first)."""
    index: dict[str, int] = {}
    for snapshot in steps:
        index.update((label, facts.index) for label, facts in snapshot.layers.items()
                     if label in snapshot.gradients or label in snapshot.activations)
    return sorted(index, key=index.__getitem__)


def _findings_table(findings: Sequence[Finding]) -> str:
    if not findings:
        return "<p>No findings: every rule below held at every captured step.</p>"
    rows = [
        f"<tr class=\"{f.severity.name.lower()}\"><td>{f.severity.name}</td><td>{html.escape(f.rule)}</td>"
        f"<td>{f.since}</td><td>{html.escape(_listed([str(s) for s in f.steps]))}</td>"
        f"<td>{html.escape(_listed(list(f.layers)))}</td><td>{html.escape(f.message)}</td></tr>"
        for f in findings
    ]
    return ("<table><tr><th>severity</th><th>rule</th><th>since</th><th>steps</th><th>layers</th>"
            "<th>finding</th></tr>\n" + "\n".join(rows) + "</table>")


def _listed(items: list[str], most: int = 8) -> str:
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


def _rules_table(rules: Sequence[Rule]) -> str:
    rows = [
        f"<tr><td>{html.escape(rule.name)}</td><td>{html.escape(rule.threshold)}</td>"
        f"<td>{html.escape(rule.reason)}</td><td>{html.escape(rule.source)}</td></tr>"
        for rule in rules
    ]
    return ("<table><tr><th>rule</th><th>threshold</th><th>why</th><th>source</th></tr>\n" + "\n".join(rows)
            + "</table>")


def _rms(summary: TensorSummary | None) -> float:
    if summary is None or not summary.finite_count or summary.l2_norm <= 0:
        return math.nan
    return summary.l2_norm / math.sqrt(summary.finite_count)


def _heatmap(figure: Any, steps: Sequence[StepSummaries], labels: list[str], flagged: set[str]) -> Any:
    rows = [label for label in labels if any(label in s.gradients for s in steps)] or labels
    values = [[math.log10(v) if (v := _rms(s.gradients.get(label))) > 0 else math.nan for s in steps]
              for label in rows]
    fig = figure(figsize=(min(3 + 0.5 * len(steps), 14), min(2 + 0.22 * len(rows), 40)), layout="constrained")
    axes = fig.add_subplot()
    image = axes.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=axes, label="log10 gradient RMS")
    axes.set_xticks(range(len(steps)), [str(s.step) for s in steps], rotation=90 if len(steps) > 12 else 0)
    axes.set_yticks(range(len(rows)), rows, fontsize=8)
    for tick, label in zip(axes.get_yticklabels(), rows, strict=True):
        if label in flagged:
            tick.set_color(_MARK)
            tick.set_fontweight("bold")
    axes.set_xlabel("captured step")
    axes.set_ylabel("layer (execution order)")
    return fig


def _lines(figure: Any, steps: Sequence[StepSummaries], labels: list[str], flagged: set[str]) -> Any:
    shown = sorted(labels, key=lambda label: label not in flagged)  # stable: those with findings first
    shown = sorted(shown[:_MAX_LINES], key=labels.index)
    fig = figure(figsize=(12, 4.5), layout="constrained")
    x = [s.step for s in steps]
    panels = (("activation std", "activations"), ("gradient RMS", "gradients"))
    for column, (title, kind) in enumerate(panels):
        axes = fig.add_subplot(1, 2, column + 1)
        for label in shown:
            if kind == "activations":
                y = [_std(s.activations.get(label)) for s in steps]
            else:
                y = [_rms(s.gradients.get(label)) for s in steps]
            if all(math.isnan(v) for v in y):
                continue
            marked = label in flagged
            axes.plot(x, y, marker="o", markersize=3, linewidth=2.5 if marked else 1.0,
                      label=label + (" (finding)" if marked else ""), color=_MARK if marked else None,
                      alpha=1.0 if marked else 0.7)
        axes.set_yscale("log")
        axes.set_title(title)
        axes.set_xlabel("captured step")
        if column == 1:
            axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


def _std(summary: TensorSummary | None) -> float:
    return summary.std if summary is not None and summary.numel > 1 and summary.std > 0 else math.nan


def _figure(fig: Any) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    svg = buffer.getvalue()
    return f"<div class=\"figure\">{svg[svg.index('<svg'):]}</div>"  # inline: no XML prologue


def _graph(run: str | os.PathLike[str], step: int, flagged: set[str]) -> str:
    dot = shutil.which("dot")
    if dot is None:
        return ("<p class=\"note\">No graph: graphviz's <code>dot</code> is not installed "
                "(apt-get install graphviz).</p>")
    folder = next(f.path for f in reversed(step_folders(run)) if f.stage == "train" and f.step == step)
    source = _marked_source(store.load(folder, micro_batch=0), flagged)
    try:
        svg = subprocess.run([dot, "-Tsvg"], input=source.encode(), capture_output=True, check=True,
                             timeout=_DOT_TIMEOUT).stdout.decode()
    except (subprocess.SubprocessError, OSError) as error:
        return f"<p class=\"note\">No graph: dot failed ({html.escape(type(error).__name__)}).</p>"
    legend = (f"<p>Step {step}. Layers with findings are drawn with a thick red border.</p>" if flagged
              else f"<p>Step {step}.</p>")
    return f"{legend}<div class=\"graph\">{svg[svg.index('<svg'):]}</div>"


def _marked_source(history: ModelHistory, flagged: set[str]) -> str:
    """The DOT source of the unrolled graph, the nodes of flagged layers outlined in red."""
    graph = build_graph(history, "unrolled", 1000)
    digraph = digraph_of(graph, "topdown")  # the input first: early layers at the top of the page
    # the ids digraph_of gave the nodes (same function, same order)
    names = [node.id for node in graph.nodes]
    ids = dict(zip(names, _dot_ids(names), strict=True))
    for node in graph.nodes:
        if flagged.intersection(node.layers):
            digraph.node(ids[node.id], color=_MARK, penwidth="4", fontcolor=_MARK)
    source: str = digraph.source
    return source


def write_report(run: str | os.PathLike[str], output: str | os.PathLike[str],
                 *, rules: Sequence[Rule] = DEFAULT_RULES) -> Path:
    """Writes :func:`render_report`'s page to ``output``; returns its path."""
    path = Path(output)
    path.write_text(render_report(run, rules=rules), encoding="utf-8")
    return path
