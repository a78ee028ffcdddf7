"""Writes each capture to a Weights & Biases run: histograms, a statistics table, the graph, an artifact.

wandb is optional: it is imported when a :class:`WandbWriter` is built, never at
``import lens_callbacks``.
"""

from __future__ import annotations

import importlib
import math
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from lens_callbacks.record import CaptureRecord
from lens_callbacks.writers.disk import DiskWriter
from lens_core import ModelHistory
from lens_core.summaries import TensorSummary

if TYPE_CHECKING:
    from lens_callbacks.findings import Finding

__all__ = ["WandbWriter"]

STEP_KEY = "lens/step"
"""The x-axis of every ``lens/*`` chart: the trainer's step of the capture."""
ARTIFACT_TYPE = "lens-capture"
TABLE_COLUMNS = (
    "label", "module", "type", "shape", "kind", "mean", "std", "min", "max", "mean_abs", "l2_norm",
    "zero_fraction", "nan_count", "inf_count", "numel",
)
FINDINGS_COLUMNS = ("severity", "rule", "since", "steps", "layers", "message", "score")
"""Columns of the ``lens/findings`` table."""
# W&B refuses histograms of more bins than this (wandb.Histogram.MAX_LENGTH).
_MAX_BINS = 512


def _import_wandb() -> ModuleType:
    try:
        return importlib.import_module("wandb")
    except ImportError as error:
        raise ImportError(
            'WandbWriter needs Weights & Biases: pip install "lens-callbacks[wandb]".'
        ) from error


class WandbWriter:
    """Logs every capture to a W&B run, at the trainer's step.

    Example::

        run = wandb.init(project="my-project")
        lens = Lens(model, every_n_steps=100, writers=[WandbWriter(run)])

        logger = WandbLogger(project="my-project")
        Trainer(logger=logger, callbacks=[LensCallback(writers=[WandbWriter.from_logger(logger)])])

    Per capture it logs, in one ``run.log`` call:

    * ``lens/activations/<module>/<label>`` and ``lens/gradients/<module>/<label>``: histograms
      of each selected layer's output and of its gradient, from the capture's own bins (exact
      counts, not re-binned by W&B; ``<module>/`` is left out for ops at top level);
      ``lens/parameter_gradients/<name>``: the same for the ``.grad`` of each parameter used;
    * ``lens/statistics``: a table with one row per layer and kind (columns
      :data:`TABLE_COLUMNS`);
    * ``lens/graph``: the graph as SVG (only when ``dot`` and a renderer are available);
    * ``lens/step``: the trainer's step.

    Captures of other stages than training go under ``lens/<stage>/...`` (for instance
    ``lens/validate/activations/...``) so they do not overwrite the training capture of the
    same step. Each capture is also logged as an artifact of type ``lens-capture``
    (``lens-capture-<run id>``, ``lens-capture-<run id>-<stage>`` for other stages) aliased
    ``step-<n>``: the step folder a :class:`DiskWriter` writes (``micro_batch_<i>/`` per
    micro-batch, the step's pooled ``summaries.json``) and ``graph.svg``. So
    ``lens_core.load(artifact.download())`` reads a step of one micro-batch back, and
    ``lens_core.load(folder, micro_batch=i)`` one of several; ``lens inspect`` takes the folder too.

    Why two step axes: W&B silently drops data logged at a step lower than the one it is at,
    and other code moves that step too (a ``WandbLogger`` advances it once per
    ``log_metrics`` call, the user's own ``run.log`` calls do). So the writer passes
    ``step=record.step`` when the run has not gone past it (the row is shared with whatever
    else is logged at that step) and otherwise logs into the run's current row; either way
    ``lens/step`` holds the capture's step and ``run.define_metric("lens/*",
    step_metric="lens/step")`` makes it the x-axis of every ``lens/*`` chart, so no capture is
    lost or misplaced. The writer never commits a row: a later ``run.log(..., step=n)`` of the
    same step still lands.

    Args:
        run: the ``wandb`` run to log to; by default the active one (``wandb.run``).
        log_dir: keep the step folders here too, as a ``DiskWriter(log_dir)`` writes them
            (``<log_dir>/step_000100/...``); by default they are written to a temporary folder,
            removed once W&B has staged them.
        save_tensors: also put full activations and gradients (safetensors) in the artifact,
            not only metadata and summaries.
        graph: render the graph of each capture (needs the ``dot`` binary).

    Raises:
        ImportError: wandb is not installed.
        ValueError: ``run`` is None and no run is active.
        TypeError: ``run`` is not a wandb run.
    """

    def __init__(
        self,
        run: Any = None,  # a wandb.Run; Any so that typing does not import wandb
        *,
        log_dir: str | Path | None = None,
        save_tensors: bool = False,
        graph: bool = True,
    ) -> None:
        wandb = _import_wandb()
        if run is None:
            run = wandb.run
            if run is None:
                raise ValueError(
                    "WandbWriter(run=None) found no active wandb run: call wandb.init(...) before "
                    "building the writer, or pass run=wandb.init(...)."
                )
        _check_run(run)
        self._run: Any = run
        self._logger: Any = None
        self._configure(log_dir, save_tensors, graph)

    @classmethod
    def from_logger(
        cls,
        logger: Any,
        *,
        log_dir: str | Path | None = None,
        save_tensors: bool = False,
        graph: bool = True,
    ) -> WandbWriter | None:
        """A writer to the run of a Lightning ``WandbLogger``; None for any other logger.

        The logger's ``experiment`` is read at the first capture, not here, so building the
        callback does not start the run early, and the writer can be pickled (``ddp_spawn``).
        On ranks other than 0 Lightning hands out a no-op experiment, and the writer does
        nothing there.

        Example::

            writers = [w for w in map(WandbWriter.from_logger, trainer_loggers) if w is not None]
        """
        if not _is_wandb_logger(logger):
            return None
        _import_wandb()
        writer = cls.__new__(cls)
        writer._run = None
        writer._logger = logger
        writer._configure(log_dir, save_tensors, graph)
        return writer

    def _configure(self, log_dir: str | Path | None, save_tensors: bool, graph: bool) -> None:
        if not isinstance(save_tensors, bool):
            raise TypeError(f"save_tensors={save_tensors!r}: use True or False.")
        if not isinstance(graph, bool):
            raise TypeError(f"graph={graph!r}: use True or False.")
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.save_tensors = save_tensors
        self.graph = graph
        self._defined_for: str | None = None
        self._graph_warned = False

    @property
    def run(self) -> Any:
        """The wandb run captures go to (the logger's experiment for :meth:`from_logger`)."""
        return self._run if self._run is not None else self._logger.experiment

    # -- the Writer protocol -------------------------------------------------------------------

    def write(self, record: CaptureRecord) -> None:
        run = self.run
        run_id = getattr(run, "id", None)
        if not isinstance(run_id, str):  # Lightning's no-op experiment off rank 0
            return
        wandb = _import_wandb()
        self._define_metrics(run, run_id)
        with self._staging() as root:
            disk = DiskWriter(root, save_tensors=self.save_tensors)
            disk.write(record)
            folder = disk.folder(record)
            graph = self._render_graph(record.history, folder) if self.graph else None
            data = self._log_data(wandb, record, graph)
            current = _current_step(run)
            step = record.step if current is not None and record.step >= current else None
            run.log(data, step=step, commit=False)
            run.log_artifact(self._artifact(wandb, record, run_id, folder), aliases=[f"step-{record.step}"])

    def write_findings(self, findings: Sequence[Finding], step: int) -> None:
        """Logs the findings new at ``step``: a ``lens/findings`` table (columns
        :data:`FINDINGS_COLUMNS`, one row per finding) and ``lens/findings_new``, their count.
        Nothing is logged when none is new."""
        run = self.run
        if not findings or not isinstance(getattr(run, "id", None), str):  # no-op experiment off rank 0
            return
        wandb = _import_wandb()
        self._define_metrics(run, run.id)
        rows = [[f.severity.name.lower(), f.rule, f.since, ", ".join(map(str, f.steps)), ", ".join(f.layers),
                 f.message, f.score] for f in findings]
        data = {STEP_KEY: step, "lens/findings": wandb.Table(columns=list(FINDINGS_COLUMNS), data=rows),
                "lens/findings_new": len(findings)}
        current = _current_step(run)
        run.log(data, step=step if current is not None and step >= current else None, commit=False)

    def close(self) -> None:
        """Nothing to release: the run is the caller's (or the logger's) to finish."""

    # -- what is logged ------------------------------------------------------------------------

    def _define_metrics(self, run: Any, run_id: str) -> None:
        if self._defined_for != run_id:
            run.define_metric(STEP_KEY)
            run.define_metric("lens/*", step_metric=STEP_KEY)
            self._defined_for = run_id

    def _log_data(self, wandb: ModuleType, record: CaptureRecord, graph: Path | None) -> dict[str, Any]:
        prefix = "lens" if record.stage == "train" else f"lens/{record.stage}"
        data: dict[str, Any] = {STEP_KEY: record.step}
        for segment, _, label, summary in _layer_summaries(record):
            module, _, _ = _layer_facts(record, label)
            key = "/".join(part for part in (prefix, segment, module, label) if part)
            _put_histogram(wandb, data, key, summary)
        for name, summary in record.parameter_gradients.items():
            _put_histogram(wandb, data, f"{prefix}/parameter_gradients/{name}", summary)
        data[f"{prefix}/statistics"] = wandb.Table(columns=list(TABLE_COLUMNS), data=_table_rows(record))
        if graph is not None:
            data[f"{prefix}/graph"] = wandb.Html(graph.read_text(), data_is_not_path=True)
        return data

    def _artifact(self, wandb: ModuleType, record: CaptureRecord, run_id: str, folder: Path) -> Any:
        """The step folder as it is on disk, so the downloaded artifact loads like the folder."""
        name = f"lens-capture-{run_id}" + ("" if record.stage == "train" else f"-{record.stage}")
        artifact = wandb.Artifact(name, type=ARTIFACT_TYPE, metadata={
            "step": record.step, "stage": record.stage, "rank": record.rank,
            "model": record.history.model_name, "micro_batches": len(record.histories),
        })
        artifact.add_dir(str(folder))
        return artifact

    @contextmanager
    def _staging(self) -> Iterator[Path]:
        """The run folder a capture is saved in before W&B copies it into its staging area."""
        if self.log_dir is not None:
            yield self.log_dir
            return
        folder = Path(tempfile.mkdtemp(prefix="lens-wandb-"))
        try:
            yield folder
        finally:  # safe: artifact files are copied to W&B's staging area when added
            shutil.rmtree(folder, ignore_errors=True)

    def _render_graph(self, history: ModelHistory, folder: Path) -> Path | None:
        # The renderer and the dot binary are both optional: without them there is no graph.
        if not hasattr(history, "render_graph") or shutil.which("dot") is None:
            return None
        try:
            return Path(history.render_graph(vis_outpath=str(folder / "graph"), vis_fileformat="svg"))
        except Exception as error:
            if not self._graph_warned:
                self._graph_warned = True
                warnings.warn(
                    f"WandbWriter could not render the graph ({type(error).__name__}: {error}); "
                    "captures are logged without it (graph=False stops trying).",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return None


# -- helpers ---------------------------------------------------------------------------------------


def _check_run(run: Any) -> None:
    if not all(callable(getattr(run, method, None)) for method in ("log", "log_artifact", "define_metric")):
        raise TypeError(
            f"run={run!r} is not a wandb run (it needs log, log_artifact and define_metric): "
            "pass the object wandb.init(...) returns, or use WandbWriter.from_logger(logger)."
        )


def _is_wandb_logger(logger: object) -> bool:
    # By class rather than isinstance: works for lightning.pytorch and pytorch_lightning alike,
    # without importing Lightning.
    return any(
        cls.__name__ == "WandbLogger" and cls.__module__.endswith("loggers.wandb")
        for cls in type(logger).__mro__
    )


def _current_step(run: Any) -> int | None:
    """The step the run's next ``log`` goes to, or None when the run cannot tell."""
    try:
        step = run.step
    except Exception:  # "shared" mode runs refuse to report it
        return None
    return step if isinstance(step, int) else None


def _layer_summaries(record: CaptureRecord) -> Iterator[tuple[str, str, str, TensorSummary]]:
    """(key segment, table kind, label, summary) of each activation and gradient summary."""
    for segment, kind, summaries in (("activations", "activation", record.activations),
                                     ("gradients", "gradient", record.gradients)):
        for label, summary in summaries.items():
            yield segment, kind, label, summary


def _layer_facts(record: CaptureRecord, label: str) -> tuple[str, str, str]:
    """Module address (``""`` at top level), op type and shape of the layer ``label``."""
    layer = record.layer(label)
    if layer is None:
        return "", "", ""
    return layer.module or "", layer.layer_type, str(tuple(layer.shape))


def _put_histogram(wandb: ModuleType, data: dict[str, Any], key: str, summary: TensorSummary) -> None:
    counts, edges = _wandb_bins(summary)
    if counts:  # no finite value: no histogram (the statistics table still has the row)
        data[key] = wandb.Histogram(np_histogram=(counts, edges))


def _wandb_bins(summary: TensorSummary) -> tuple[list[int], list[float]]:
    """The summary's bins, merged by groups of k adjacent ones if W&B would refuse that many.

    Merging whole bins keeps the counts exact, unlike re-binning the values.
    """
    counts, edges = list(summary.histogram.counts), list(summary.histogram.edges)
    group = math.ceil(len(counts) / _MAX_BINS)
    if group <= 1:
        return counts, edges
    merged = [sum(counts[start:start + group]) for start in range(0, len(counts), group)]
    return merged, [*edges[:-1:group], edges[-1]]


def _table_rows(record: CaptureRecord) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for _, kind, label, summary in _layer_summaries(record):
        rows.append([label, *_layer_facts(record, label), kind, *_statistics(summary)])
    # A parameter's row names the op that used it first (reversed: the earliest use wins).
    users: dict[str, tuple[str, str]] = {
        param.name: (layer.layer_type, str(param.shape))
        for history in reversed(record.histories) for layer in reversed(history.layer_list)
        for param in layer.params
    }
    for name, summary in record.parameter_gradients.items():
        layer_type, shape = users.get(name, ("", ""))
        rows.append([name, name.rpartition(".")[0], layer_type, shape, "param_grad", *_statistics(summary)])
    return rows


def _statistics(summary: TensorSummary) -> list[Any]:
    return [summary.mean, summary.std, summary.min, summary.max, summary.mean_abs, summary.l2_norm,
            summary.zero_fraction, summary.nan_count, summary.inf_count, summary.numel]
