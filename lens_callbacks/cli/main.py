"""``lens``: look at the captures a run wrote to disk, from a terminal.

A capture is most often looked at on the machine that trained, over ssh, long after the run:
with no notebook at hand, and sometimes while the run is still writing. So each subcommand
reads the disk store and prints plain text, and every way a folder can be unusable ends in one
line on stderr that names the path and the fix, with exit code 2, never a traceback. Captures
may come from anyone: every string from one (and every path) is printed with its control
characters escaped (:func:`~lens_callbacks.cli.text.escape`)::

    lens list runs/lens                          # the captures of a run
    lens inspect runs/lens/step_000100           # layers, shapes, statistics
    lens diff runs/lens/step_000100 runs/lens/step_000200 --top 10
    lens graph runs/lens/step_000100 -o graph.svg --rolled --depth 2
    lens findings runs/lens                      # what went wrong in training, where, since when
    lens report runs/lens -o report.html         # the same as an HTML page with plots

Installed as a console script (``lens = "lens_callbacks.cli:main"``); also
``python -m lens_callbacks.cli``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from lens_callbacks.cli import report
from lens_callbacks.cli.captures import (
    CaptureView,
    CliError,
    RunEntry,
    history_folder,
    list_run,
    open_capture,
)
from lens_callbacks.cli.diff import STATISTICS, Comparison, Statistic, compare
from lens_callbacks.cli.text import MISSING, escape, human_bytes, number, percent, table
from lens_core import store
from lens_core.errors import LensError
from lens_core.graph.render import DEFAULT_TIMEOUT, RenderTimeoutError, check_render_options
from lens_core.summaries import TensorSummary

__all__ = ["main"]

EXIT_ERROR = 2
"""Exit status of a command that could not use its input (argparse's own, for usage errors)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``lens`` command line; returns its exit status.

    Args:
        argv: the arguments after the program name; ``sys.argv[1:]`` by default.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], None] = args.run
    try:
        command(args)
        sys.stdout.flush()  # here, where a closed pipe can still be handled
    except (CliError, LensError, OSError) as error:
        # LensError: CaptureFormatError (damaged, another format version) and RenderError (no
        # dot binary). Each message names the path and what to do.
        if isinstance(error, BrokenPipeError):
            return _reader_left()
        print(f"lens {args.command}: error: {escape(str(error))}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def _reader_left() -> int:
    """``lens inspect ... | head`` closed the pipe: no message, and no second failure at exit."""
    # Python flushes stdout once more at exit; pointed at devnull, that flush cannot fail again.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1


# -- the parser ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens", description="Inspect, compare, draw and list the captures lens_callbacks wrote to disk.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    capture_help = ("a step folder (RUN_DIR/step_000100, or a downloaded lens-capture W&B artifact) or a "
                    "history folder (.../micro_batch_0)")

    inspect = commands.add_parser(
        "inspect", help="print the layers, shapes and statistics of a capture",
        description="Print the model-level facts of a capture and a table of its layers: shape, dtype, "
                    "module, and the statistics of the output and of its gradient when saved.",
    )
    inspect.add_argument("path", type=Path, metavar="PATH", help=capture_help)
    inspect.set_defaults(run=_inspect)

    graph = commands.add_parser(
        "graph", help="draw the graph of a capture with graphviz",
        description="Render the graph of a capture's forward pass with graphviz's dot (the Python "
                    "package graphviz and the dot binary are needed).",
    )
    graph.add_argument("path", type=Path, metavar="PATH", help=capture_help)
    graph.add_argument("-o", "--output", type=Path, required=True, metavar="OUT",
                       help="file to write; its extension is the format (graph.svg, graph.pdf, graph.png)")
    graph.add_argument("--rolled", action="store_true",
                       help="one node per layer for all its passes (default: one node per pass)")
    graph.add_argument("--depth", type=_positive_int, default=1000, metavar="N",
                       help="draw modules nested deeper than N as single nodes (default: draw all)")
    graph.add_argument("--direction", choices=("bottomup", "topdown", "leftright"), default="bottomup",
                       help="where the inputs are drawn (default: bottomup)")
    graph.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                       help=f"give up when dot takes longer (default: {DEFAULT_TIMEOUT:g})")
    graph.set_defaults(run=_graph)

    diff = commands.add_parser(
        "diff", help="rank the layers by how much their statistics changed between two captures",
        description="Match the layers of two captures by label and rank them by the relative change "
                    "(B - A) / |A| of one statistic, largest first, for activations, gradients and "
                    "parameter gradients. mean_abs, the default, is the mean magnitude: it does not "
                    "grow with the batch size as l2_norm does, nor cross zero as mean does.",
    )
    diff.add_argument("path_a", type=Path, metavar="PATH_A", help=f"the first capture: {capture_help}")
    diff.add_argument("path_b", type=Path, metavar="PATH_B", help="the second capture")
    diff.add_argument("--top", type=_positive_int, default=20, metavar="N",
                      help="show the N largest changes of each kind (default: 20)")
    diff.add_argument("--stat", choices=STATISTICS, default="mean_abs",
                      help="the statistic compared (default: mean_abs)")
    diff.set_defaults(run=_diff)

    listing = commands.add_parser(
        "list", help="list the captures of a run",
        description="List the step folders of a run (also those under rank_<k>/), sorted by step, with "
                    "their stage, rank, micro-batches, layers (ops recorded in micro_batch_0), selected "
                    "(layers chosen with layers=), size on disk and path. Steps that cannot be read "
                    "completely are listed too, with what is wrong.",
    )
    listing.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                         help="the folder a DiskWriter wrote to (a LensCallback's is <log_dir>/lens)")
    listing.set_defaults(run=_list)
    report.add_commands(commands)  # lens findings, lens report
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; use an int >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too small; use an int >= 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds > 0")
    return value


# -- lens inspect ---------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> None:
    view = open_capture(args.path)
    print(_header(view))
    print()
    print(_layers_table(view))
    parameters = view.statistics.parameter_gradients
    if parameters:
        print()
        print(f"Parameter gradients ({len(parameters)}):")
        print(_parameters_table(parameters))


def _header(view: CaptureView) -> str:
    history = view.history
    structure = (f"recurrent (at most {history.max_passes} passes)" if history.is_recurrent
                 else "purely feedforward")
    branching = "with" if history.is_branching else "without"
    rows = [
        ("Capture", f"{view.path} ({view.describe()})"),
        ("History", str(view.history_path)),
        ("Model", f"{history.model_name}: {len(history)} layers ({len(history.layer_labels)} selected, "
                  f"{history.num_tensors_saved} saved), {len(history.module_addresses)} modules, "
                  f"{history.total_params:,} params ({human_bytes(history.total_param_bytes)})"),
        ("Structure", f"{structure}, {branching} branching"),
        ("Statistics", view.statistics.source),
    ]
    return "\n".join(f"{name:<11} {escape(text)}" for name, text in rows)


def _layers_table(view: CaptureView) -> str:
    activations, gradients = view.statistics.activations, view.statistics.gradients
    headers = ["#", "label", "shape", "dtype", "module", "mean", "std", "min", "max",
               "grad mean_abs", "grad l2_norm", "non-finite"]
    rows = []
    for layer in view.history.layer_list:
        act, grad = activations.get(layer.label), gradients.get(layer.label)
        rows.append([
            str(layer.index), layer.label, _shape(layer.shape), str(layer.dtype).removeprefix("torch."),
            layer.module or MISSING,
            *(number(None if act is None else value) for value in _moments(act)),
            number(None if grad is None else grad.mean_abs), number(None if grad is None else grad.l2_norm),
            _non_finite({"out": act, "grad": grad}) or MISSING,
        ])
    title = "Layers (mean, std, min, max: the output; grad: the gradient of the loss with respect to it):"
    return title + "\n" + table(headers, rows, numeric={0, 5, 6, 7, 8, 9, 10})


def _moments(summary: TensorSummary | None) -> tuple[float | None, ...]:
    if summary is None:
        return (None,) * 4
    return summary.mean, summary.std, summary.min, summary.max


def _parameters_table(parameters: Mapping[str, TensorSummary]) -> str:
    headers = ["parameter", "numel", "mean_abs", "std", "l2_norm", "min", "max", "non-finite"]
    rows = [
        [name, f"{s.numel:,}", number(s.mean_abs), number(s.std), number(s.l2_norm), number(s.min),
         number(s.max), _non_finite({"grad": s}) or MISSING]
        for name, s in parameters.items()
    ]
    return table(headers, rows, numeric={1, 2, 3, 4, 5, 6})


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _non_finite(summaries: Mapping[str, TensorSummary | None]) -> str:
    """``grad: 3 nan, 1 inf``: the values the statistics leave out, which a reader must not miss."""
    notes = []
    for name, summary in summaries.items():
        if summary is None:
            continue
        counts = [f"{count} {what}" for count, what in
                  ((summary.nan_count, "nan"), (summary.inf_count, "inf")) if count]
        if counts:
            notes.append(f"{name}: {', '.join(counts)}")
    return "; ".join(notes)


# -- lens graph -------------------------------------------------------------------------------------


def _graph(args: argparse.Namespace) -> None:
    output: Path = args.output
    fileformat = output.suffix.removeprefix(".").lower()
    try:
        check_render_options(vis_fileformat=fileformat)
    except ValueError:
        raise CliError(
            f"-o {output}: the extension names the output format; use one dot can write, e.g. "
            f"{output.with_suffix('.svg')}, .pdf or .png."
        ) from None
    history = store.load(history_folder(args.path))
    try:
        with warnings.catch_warnings(record=True) as caught:  # dot's complaints, as one line each
            warnings.simplefilter("always")
            written = history.render_graph(
                vis_opt="rolled" if args.rolled else "unrolled", vis_nesting_depth=args.depth,
                vis_outpath=str(output), vis_fileformat=fileformat, vis_direction=args.direction,
                timeout=args.timeout,
            )
    except ImportError as error:  # the graphviz package; the message says what to install
        raise CliError(str(error)) from None
    except RenderTimeoutError as error:
        raise CliError(f"{error} (Here --depth sets vis_nesting_depth, --timeout the timeout.)") from None
    for warning in caught:
        print(f"lens graph: warning: {escape(str(warning.message))}", file=sys.stderr)
    print(f"wrote {escape(written)}")


# -- lens diff --------------------------------------------------------------------------------------


def _diff(args: argparse.Namespace) -> None:
    a, b = open_capture(args.path_a), open_capture(args.path_b)
    for view in (a, b):
        if not _has_statistics(view):
            raise CliError(
                f"{view.path} has no statistics to compare (its statistics: {view.statistics.source}); "
                "capture with DiskWriter (it saves summaries) or with save_tensors=True."
            )
    statistic: Statistic = args.stat
    print(escape(f"A  {a.path} ({a.describe()})"))
    print(escape(f"B  {b.path} ({b.describe()})"))
    print(f"Ranked by the relative change of {statistic}, (B - A) / |A|, largest first.")
    order = [layer.label for layer in a.history.layer_list]
    sections = (
        ("Activations", "layer", a.statistics.activations, b.statistics.activations),
        ("Gradients", "layer", a.statistics.gradients, b.statistics.gradients),
        ("Parameter gradients", "parameter", a.statistics.parameter_gradients,
         b.statistics.parameter_gradients),
    )
    for title, what, before, after in sections:
        if before or after:
            print()
            print(_diff_section(title, what, compare(before, after, statistic, order), statistic, args.top))


def _has_statistics(view: CaptureView) -> bool:
    statistics = view.statistics
    return bool(statistics.activations or statistics.gradients or statistics.parameter_gradients)


def _diff_section(title: str, what: str, comparison: Comparison, statistic: str, top: int) -> str:
    shown = comparison.changes[:top]
    if shown:
        lines = [f"{title}: {len(comparison.changes)} {what}s in both, the {len(shown)} largest changes:"]
        rows = [[change.name, number(change.before), number(change.after), percent(change.relative)]
                for change in shown]
        lines.append(table([what, f"A {statistic}", f"B {statistic}", "change"], rows, numeric={1, 2, 3}))
    else:
        lines = [f"{title}: no {what} has statistics in both."]
    for side, names in (("A", comparison.only_in_a), ("B", comparison.only_in_b)):
        if names:
            lines.append(escape(f"Only in {side} ({len(names)}): {', '.join(names)}"))
    return "\n".join(lines)


# -- lens list --------------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> None:
    entries = list_run(args.run_dir)
    headers = ["step", "stage", "rank", "micro-batches", "layers", "selected", "size", "path"]
    rows = [[str(e.step), e.stage, _optional(e.rank), str(e.micro_batches), _optional(e.layers),
             _optional(e.selected), human_bytes(e.size), str(e.path)] for e in entries]
    print(table(headers, rows, numeric={0, 2, 3, 4, 5, 6}))
    damaged = [entry for entry in entries if entry.problems]
    if damaged:
        print()
        print(f"{len(damaged)} of {len(entries)} captures cannot be read completely:")
        print("\n".join(_problems(entry) for entry in damaged))


def _optional(value: int | None) -> str:
    return MISSING if value is None else str(value)


def _problems(entry: RunEntry) -> str:
    return escape(f"  {entry.path}: " + "; ".join(entry.problems))

