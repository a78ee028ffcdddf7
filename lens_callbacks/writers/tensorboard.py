"""Writes each capture to TensorBoard: the op graph, histograms from our bins, a few scalars.

Tags, for a capture of training at step 100 (captures of other stages say so:
``lens.validate.activations/...``, ``lens.validate.graph/...``):

==============================================  ================================================
``lens.graph/step_000100``                       the op graph of the step, with compute time and
                                                 memory per op (graph panel, "Tag"; "Profile")
(the run graph: "Default" in the graph panel)    the graph of the first capture, written once
``lens.activations/features.6/conv2d_3_7``       histogram of an op's output: module, then label
                                                 (ops outside any module, inputs and outputs
                                                 have no module part: ``lens.activations/add_1_4``)
``lens.gradients/features.6/conv2d_3_7``         histogram of the gradient of that output
``lens.param_grads/features.6.weight``           histogram of a parameter's ``.grad``
``lens.activations.std/features.6/conv2d_3_7``   scalars: ``lens.<kind>.<statistic>/<path>``,
``lens.gradients.l2_norm/...``                   the few of :data:`CURATED_SCALARS` by default,
``lens.param_grads.l2_norm/...``                 all of :data:`STATISTICS` with ``scalars="all"``
``lens.findings`` (text)                         training health findings new at a step, a table
``lens.findings/<rule>``, ``lens.findings/new``  how far past its threshold each new finding is
                                                 (orders of magnitude), how many are new
==============================================  ================================================

Why this shape: TensorBoard groups a dashboard's cards by the tag's first ``/``-component, so
the kind (and, for scalars, the statistic) comes first: one group holds the activation
histograms of every layer, sorted by module; another the ``std`` of every activation, which is
how layers are compared. Module addresses keep their dots, as typed in Python. A layer's tags
are its module and label, which are the same at every captured step: one series per layer.

Which scalars, by default. Nine statistics of every layer of three kinds is hundreds of charts
(342 for the demo's CNN), most of them flat: the histograms already show each distribution, so
the scalars keep what a person compares across layers and steps:

* ``activations.std``: the scale of the signal at each op. Per value, so layers of different
  sizes compare (``l2_norm`` grows with the number of values): vanishing or exploding
  activations and a bad initialisation show here. Not for a single value (the loss): it has
  no spread;
* ``activations.zero_fraction``: dead ReLUs. Written only where the output has exact zeros
  (ReLU, dropout, pooling after them): for the other ops it would be a flat zero;
* ``gradients.l2_norm`` and ``param_grads.l2_norm``: the gradient norm, the number gradient
  clipping and Lightning's ``grad_norm`` use: vanishing or exploding gradients show here;
* ``nan_count`` and ``inf_count`` of every kind: written only for a layer and step where they
  are not zero, so a NaN appears as a new group rather than hiding among flat zeros.

Scalars written only where non-zero are sparse series: TensorBoard joins the points it has, so
a captured step without a point reads as zero, not as the line between its neighbours.
``scalars="all"`` writes every statistic of every layer at every capture, as dense series.

Histograms are our exact bins (``lens_core.summaries``), written raw: bucket counts are the
summary's counts, not TensorBoard's re-binning of values. Everything is written at
``record.step`` and flushed at once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lens_callbacks.record import CaptureRecord
from lens_core import TensorSummary

if TYPE_CHECKING:
    from lens_callbacks.findings import Finding

__all__ = ["TensorBoardWriter"]

_INSTALL_HINT = 'pip install "lens-callbacks[tensorboard]"'
# Every statistic of a summary: what scalars="all" writes, one tag group each (per kind).
STATISTICS = ("mean", "std", "min", "max", "mean_abs", "l2_norm", "zero_fraction", "nan_count", "inf_count")
# What scalars=True writes, per kind (why: the module docstring).
CURATED_SCALARS: dict[str, tuple[str, ...]] = {
    "activations": ("std", "zero_fraction", "nan_count", "inf_count"),
    "gradients": ("l2_norm", "nan_count", "inf_count"),
    "param_grads": ("l2_norm", "nan_count", "inf_count"),
}
# Of those, the ones written only where they are not zero (a flat zero says nothing).
_WHEN_NONZERO = frozenset({"zero_fraction", "nan_count", "inf_count"})
# Where Lightning keeps its TensorBoard loggers; looked up in sys.modules, never imported.
_LOGGER_MODULES = ("lightning.pytorch.loggers", "lightning.fabric.loggers", "pytorch_lightning.loggers")


@dataclass(frozen=True)
class _FromLogger:
    """What :meth:`TensorBoardWriter.from_logger` hands the constructor."""

    logger: Any


def _summary_writer_class() -> type[Any]:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415  # optional dependency
    except ImportError as error:
        raise ImportError(
            f"TensorBoardWriter needs TensorBoard: {_INSTALL_HINT} (or use DiskWriter)."
        ) from error
    return SummaryWriter


class TensorBoardWriter:
    """Writes captures to TensorBoard: graph panel, histograms and scalars (see the module tags).

    Example::

        writer = TensorBoardWriter("runs/exp1")
        lens = Lens(model, layers="conv", every_n_steps=100, writers=[writer])

        logger = TensorBoardLogger("logs")
        Trainer(logger=logger, callbacks=[LensCallback(writers=[TensorBoardWriter.from_logger(logger)])])

    Args:
        logdir_or_writer: a folder for a new ``SummaryWriter`` (closed by :meth:`close`), or a
            ``torch.utils.tensorboard.SummaryWriter`` to add to (flushed, left open).
        graphs: write the op graph of each capture (and the run graph once).
        histograms: write histograms of activations, gradients and parameter gradients.
        scalars: which of their statistics to write as scalars. ``True``: a few per layer
            (:data:`CURATED_SCALARS`: the ``std`` of activations, the ``l2_norm`` of
            gradients and parameter gradients; zero fractions, NaN and Inf counts only where
            not zero). ``"all"``: every statistic (:data:`STATISTICS`) of every layer at every
            capture. ``False``: none.

    Raises:
        ImportError: TensorBoard is not installed (with the command that installs it).
        TypeError: ``logdir_or_writer`` is neither a path nor a ``SummaryWriter``, or an option
            has the wrong type.
        ValueError: ``scalars`` is a string other than ``"all"``.
    """

    save_tensors = False  # summaries and metadata only (see the Writer protocol)

    def __init__(
        self,
        logdir_or_writer: str | os.PathLike[str] | Any,
        *,
        graphs: bool = True,
        histograms: bool = True,
        scalars: bool | Literal["all"] = True,
    ) -> None:
        summary_writer = _summary_writer_class()
        for name, value in (("graphs", graphs), ("histograms", histograms)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}.")
        self.graphs = graphs
        self.histograms = histograms
        self.scalars = _check_scalars(scalars)
        self._owned = isinstance(logdir_or_writer, (str, os.PathLike))
        self._experiment: Any = None
        self._source: Any = None  # a Lightning logger whose experiment is looked up late
        if self._owned:
            self._experiment = summary_writer(log_dir=str(Path(logdir_or_writer)))
        elif isinstance(logdir_or_writer, summary_writer):
            self._experiment = logdir_or_writer
        elif isinstance(logdir_or_writer, _FromLogger):
            self._source = logdir_or_writer.logger
        else:
            raise TypeError(
                f"logdir_or_writer must be a folder (str or Path) or a "
                f"torch.utils.tensorboard.SummaryWriter, got {type(logdir_or_writer).__name__}. "
                "For a Lightning TensorBoardLogger use TensorBoardWriter.from_logger(logger)."
            )
        self._run_graph_written = False

    @classmethod
    def from_logger(cls, logger: Any, **options: Any) -> TensorBoardWriter | None:
        """A writer into a Lightning ``TensorBoardLogger``'s run; None for any other logger.

        The logger's ``experiment`` is looked up at the first capture, not here, so the logger
        picks its version folder as usual and, on ranks other than 0 (where Lightning gives no
        experiment), nothing is written. The logger stays open: Lightning closes it.

        Args:
            logger: a logger of the Trainer (``trainer.logger``), or anything else.
            **options: ``graphs``, ``histograms``, ``scalars`` as in the constructor.
        """
        types = tuple(
            sys.modules[name].TensorBoardLogger
            for name in _LOGGER_MODULES
            if hasattr(sys.modules.get(name), "TensorBoardLogger")
        )
        if not types or not isinstance(logger, types):
            return None
        return cls(_FromLogger(logger), **options)

    @property
    def experiment(self) -> Any:
        """The ``SummaryWriter`` written to (None off rank 0 for a Lightning logger)."""
        if self._experiment is None and self._source is not None:
            candidate = self._source.experiment
            if isinstance(candidate, _summary_writer_class()):
                self._experiment = candidate
        return self._experiment

    def write(self, record: CaptureRecord) -> None:
        experiment = self.experiment
        if experiment is None:
            return
        prefix = "lens" if record.stage == "train" else f"lens.{record.stage}"
        if self.graphs:
            self._write_graphs(experiment, record, prefix)
        kinds = (
            ("activations", record.activations, True),
            ("gradients", record.gradients, True),
            ("param_grads", record.parameter_gradients, False),
        )
        for kind, summaries, by_layer in kinds:
            for name, summary in summaries.items():
                path = _layer_path(record, name) if by_layer else name
                if self.histograms:
                    _write_histogram(experiment, f"{prefix}.{kind}/{path}", summary, record.step)
                for statistic, value in self._scalars(kind, summary):
                    experiment.add_scalar(f"{prefix}.{kind}.{statistic}/{path}", value, record.step)
        # Captures are rare and users watch for them: show them now, not after flush_secs.
        experiment.flush()

    def write_findings(self, findings: Sequence[Finding], step: int) -> None:
        """Writes the findings new at ``step``: a table in the text panel and one scalar each.

        ``lens.findings/<rule>`` is how far past its threshold a finding is (orders of
        magnitude); ``lens.findings/new`` counts them. Nothing is written when none is new.
        """
        experiment = self.experiment
        if experiment is None or not findings:
            return
        experiment.add_text("lens.findings", _findings_markdown(findings), step)
        for finding in findings:
            experiment.add_scalar(f"lens.findings/{finding.rule}", finding.score, step)
        experiment.add_scalar("lens.findings/new", len(findings), step)
        experiment.flush()

    def _scalars(self, kind: str, summary: TensorSummary) -> Iterator[tuple[str, float]]:
        """(statistic, value) of each scalar to write for one summary."""
        if self.scalars is False:
            return
        if self.scalars == "all":
            for statistic in STATISTICS:
                yield statistic, float(getattr(summary, statistic))
            return
        for statistic in CURATED_SCALARS[kind]:
            value = float(getattr(summary, statistic))
            if statistic in _WHEN_NONZERO and not value > 0:
                continue
            if statistic == "std" and summary.numel == 1:  # always 0
                continue
            yield statistic, value

    def close(self) -> None:
        """Flushes; closes the ``SummaryWriter`` only if this writer created it."""
        if self._experiment is None:
            return
        if self._owned:
            self._experiment.close()
        else:
            self._experiment.flush()

    def _write_graphs(self, experiment: Any, record: CaptureRecord, prefix: str) -> None:
        from tensorboard.compat.proto import event_pb2  # noqa: PLC0415  # optional dependency

        from lens_callbacks.writers import tensorboard_graph  # noqa: PLC0415  # imports TensorBoard's protos

        graph = tensorboard_graph.graph_def(record.history)
        file_writer = experiment._get_file_writer()  # what SummaryWriter.add_* use; reopens if closed
        if not self._run_graph_written:
            file_writer.add_event(event_pb2.Event(graph_def=graph.SerializeToString()))
            self._run_graph_written = True
        metadata = tensorboard_graph.run_metadata(record.history, graph)
        file_writer.add_summary(
            _run_metadata_summary(f"{prefix}.graph/step_{record.step:06d}", metadata.SerializeToString()),
            record.step,
        )


def _check_scalars(scalars: object) -> bool | Literal["all"]:
    if isinstance(scalars, bool):
        return scalars
    message = f'scalars={scalars!r}: use True (a few per layer), "all" (every statistic) or False (none).'
    if not isinstance(scalars, str):
        raise TypeError(message)
    if scalars != "all":
        raise ValueError(message)
    return "all"


def _findings_markdown(findings: Sequence[Finding]) -> str:
    """A markdown table (TensorBoard's text panel renders markdown)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    rows = ["| severity | rule | since | layers | finding |", "|---|---|---|---|---|"]
    rows += [
        f"| {f.severity.name} | {f.rule} | {f.since} | {cell(', '.join(f.layers[:8]))}"
        f"{' ...' if len(f.layers) > 8 else ''} | {cell(f.message)} |"
        for f in findings
    ]
    return "\n".join(rows)


def _layer_path(record: CaptureRecord, label: str) -> str:
    """``features.6/conv2d_3_7``: the module the op ran in, as in the graph's scopes.

    Inputs and outputs ran in no module: they sit at top level.
    """
    layer = record.layer(label)
    module = layer.module if layer is not None else None
    return f"{module}/{label}" if module else label


def _write_histogram(experiment: Any, tag: str, summary: TensorSummary, step: int) -> None:
    counts = summary.histogram.counts
    if not counts:  # no finite value: nothing to draw (the nan/inf counts say why)
        return
    count = summary.finite_count
    experiment.add_histogram_raw(
        tag,
        min=summary.min,
        max=summary.max,
        num=count,
        sum=summary.mean * count,
        sum_squares=(summary.std**2 + summary.mean**2) * count,
        bucket_limits=list(summary.histogram.edges[1:]),  # TensorBoard takes right edges
        bucket_counts=list(counts),
        global_step=step,
    )


def _run_metadata_summary(tag: str, serialized: bytes) -> Any:
    """The summary TensorFlow's ``tf.summary.trace_export(profiler=True)`` writes.

    Plugin ``graph_run_metadata`` (not ``graph_run_metadata_graph``): TensorBoard serves the
    graph of both, but the step statistics, which colour the graph by compute time and
    memory, only from this one (``/data/plugin/graphs/run_metadata``).
    """
    from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2  # noqa: PLC0415

    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="graph_run_metadata", content=b"1"),
        data_class=summary_pb2.DATA_CLASS_BLOB_SEQUENCE,
    )
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]),
        string_val=[serialized],
    )
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)])
