"""Writes each capture to a folder: histories (JSON + safetensors) and summaries."""

from __future__ import annotations

import json
from pathlib import Path

from lens_callbacks.record import CaptureRecord
from lens_core import AnomalyReport, store

__all__ = ["DiskWriter"]


def capture_dirname(record: CaptureRecord) -> str:
    """``step_000100`` for training, ``validate_step_000100`` for the other stages."""
    prefix = "" if record.stage == "train" else f"{record.stage}_"
    return f"{prefix}step_{record.step:06d}"


class DiskWriter:
    """Saves every capture under ``root``: ``root/step_000100/micro_batch_0/`` and so on.

    Each micro-batch folder is a saved history (``lens_core.load`` reads it back); the step
    folder also holds ``summaries.json`` with the pooled statistics of all micro-batches.

    Args:
        root: the run folder.
        save_tensors: also store full activations and gradients (safetensors), not just
            the metadata and summaries.
        per_rank: put captures in ``root/rank_<k>/`` (when several ranks capture).
    """

    def __init__(self, root: str | Path, *, save_tensors: bool = False, per_rank: bool = False) -> None:
        self.root = Path(root)
        self.save_tensors = save_tensors
        self.per_rank = per_rank

    def folder(self, record: CaptureRecord) -> Path:
        base = self.root / f"rank_{record.rank}" if self.per_rank else self.root
        return base / capture_dirname(record)

    def write(self, record: CaptureRecord) -> None:
        folder = self.folder(record)
        folder.mkdir(parents=True, exist_ok=True)
        for index, history in enumerate(record.histories):
            store.save(history, folder / f"micro_batch_{index}", tensors=self.save_tensors,
                       summaries=record.activations if index == 0 else None,
                       extra={"step": record.step, "stage": record.stage, "rank": record.rank},
                       overwrite=True)
        summaries = {
            "step": record.step, "stage": record.stage, "rank": record.rank,
            "activations": {k: v.to_dict() for k, v in record.activations.items()},
            "gradients": {k: v.to_dict() for k, v in record.gradients.items()},
            "parameter_gradients": {k: v.to_dict() for k, v in record.parameter_gradients.items()},
        }
        temporary = folder / ".summaries.json.tmp"
        temporary.write_text(json.dumps(summaries))
        temporary.replace(folder / "summaries.json")

    def write_anomaly(self, report: AnomalyReport) -> None:
        """Writes the anomaly report as ``anomaly.json`` in the folder of its step."""
        folder = self.root / f"step_{report.step or 0:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / ".anomaly.json.tmp"
        temporary.write_text(json.dumps(report.to_dict(), indent=1))
        temporary.replace(folder / "anomaly.json")

    def close(self) -> None:
        """Nothing to release: every capture is complete on disk when ``write`` returns."""
