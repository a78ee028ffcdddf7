"""``lens findings RUN`` and ``lens report RUN -o report.html``: a run's training health.

Both read every finished training step of a run folder, run the rules of
:mod:`lens_callbacks.findings` over them and show what went wrong, where and since when:
``findings`` as plain text (or JSON), ``report`` as one self-contained HTML page with plots.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lens_callbacks.cli.captures import CliError
from lens_callbacks.cli.text import escape
from lens_callbacks.findings import Finding, StepSummaries, find, load_run

__all__ = ["add_commands"]

_RUN_HELP = "the folder a DiskWriter wrote to (a LensCallback's is <log_dir>/lens)"


def add_commands(commands: Any) -> None:
    """Adds the ``findings`` and ``report`` subcommands to the ``lens`` parser's subparsers."""
    findings = commands.add_parser(
        "findings", help="name what went wrong in a run: vanishing gradients, dead units, overflow ahead ...",
        description="Run the training-health rules over every captured training step of a run and print "
                    "the findings, most severe first, each with the layers and steps concerned.",
    )
    findings.add_argument("run_dir", type=Path, metavar="RUN_DIR", help=_RUN_HELP)
    findings.add_argument("--rank", type=int, default=None, metavar="K",
                          help="the rank whose steps to read, for a run written per rank (default: the "
                               "lowest)")
    findings.add_argument("--json", action="store_true", help="print the findings as a JSON list")
    findings.set_defaults(run=_findings)

    report = commands.add_parser(
        "report", help="write a self-contained HTML page of a run's health",
        description="Write one HTML page with the findings, a gradient-flow heatmap, the statistics of "
                    "each layer over the captured steps and the graph of the last capture with the layers "
                    "that have findings marked. It loads nothing from the network. Needs matplotlib.",
    )
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help=_RUN_HELP)
    report.add_argument("-o", "--output", type=Path, required=True, metavar="OUT",
                        help="the HTML file to write (report.html)")
    report.set_defaults(run=_report)


def _load(run_dir: Path, rank: int | None = None) -> list[StepSummaries]:
    if not run_dir.is_dir():
        raise CliError(f"{escape(str(run_dir))} is not a folder; pass the run folder a DiskWriter wrote to.")
    try:
        return load_run(run_dir, rank=rank)
    except ValueError as error:
        raise CliError(escape(str(error))) from None


def _findings(args: argparse.Namespace) -> None:
    steps = _load(args.run_dir, args.rank)
    findings = find(steps)
    if args.json:
        print(json.dumps([finding.to_dict() for finding in findings], indent=1))
        return
    captured = f"{len(steps)} captured step(s): " + (
        f"{steps[0].step}" if len(steps) == 1 else f"{steps[0].step} ... {steps[-1].step}")
    if not findings:
        print(f"No findings in {escape(str(args.run_dir))} ({captured}).")
        return
    print(f"{len(findings)} finding(s) in {escape(str(args.run_dir))} ({captured}), most severe first:")
    for finding in findings:
        print()
        print(_described(finding))


def _described(finding: Finding) -> str:
    steps = ", ".join(map(str, finding.steps[:10])) + (" ..." if len(finding.steps) > 10 else "")
    layers = ", ".join(finding.layers[:10]) + (f" and {len(finding.layers) - 10} more"
                                               if len(finding.layers) > 10 else "")
    # labels and module names come from the capture: escaped, as every string of lens is
    return "\n".join([
        f"{finding.severity.name:<8}{finding.rule}  since step {finding.since}  (steps {steps})",
        f"        {escape(finding.message)}",
        f"        layers: {escape(layers)}",
    ])


def _report(args: argparse.Namespace) -> None:
    output: Path = args.output
    if output.suffix.lower() not in (".html", ".htm"):
        raise CliError(f"-o {output}: the report is an HTML page; name it {output.with_suffix('.html')}.")
    _load(args.run_dir)  # the same one-line errors as lens findings
    from lens_callbacks.findings.report import write_report  # noqa: PLC0415  # imports graph code

    try:
        written = write_report(args.run_dir, output)
    except ImportError as error:  # matplotlib; the message says what to install
        raise CliError(str(error)) from None
    print(f"wrote {escape(str(written))}")
