"""Writes each capture to a folder: histories (JSON + safetensors) and summaries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

from lens_callbacks.record import CaptureRecord
from lens_core import AnomalyReport, store
from lens_core.store.folders import STEP_SUMMARIES, micro_batch_name, rank_folder_name, step_folder_name

__all__ = ["DiskWriter"]


class DiskWriter:
    """Saves every capture under ``root``: ``root/step_000100/micro_batch_0/`` and so on.

    Each micro-batch folder is a saved history; the step folder also holds ``summaries.json``
    with the pooled statistics of all micro-batches, written last. ``lens_core.load`` reads a
    step folder of one micro-batch as its history, one of several with ``micro_batch=i``
    (the layout: :mod:`lens_core.store.folders`).

    Args:
        root: the run folder.
        save_tensors: also store full activations and gradients (safetensors), not just
            the metadata and summaries.
        per_rank: put captures in ``root/rank_<k>/`` (when several ranks capture).
    """

    def __init__(self, root: str | Path, *, save_tensors: bool = False, per_rank: bool = False) -> None:
        from lens_callbacks import _checks  # noqa: PLC0415  # _checks imports this package

        self.root = cast(Path, _checks.check_path("root", root))
        self.save_tensors = _checks.check_bool("save_tensors", save_tensors)
        self.per_rank = _checks.check_bool("per_rank", per_rank)

    def folder(self, record: CaptureRecord) -> Path:
        """The step folder of ``record``: ``root/[rank_<k>/]<stage_>step_<n>``."""
        base = self.root / rank_folder_name(record.rank) if self.per_rank else self.root
        return base / step_folder_name(record.step, record.stage)

    def write(self, record: CaptureRecord) -> None:
        folder = self.folder(record)
        folder.mkdir(parents=True, exist_ok=True)
        for index, history in enumerate(record.histories):
            store.save(history, folder / micro_batch_name(index), tensors=self.save_tensors,
                       summaries=record.activations if index == 0 else None,
                       extra={"step": record.step, "stage": record.stage, "rank": record.rank},
                       overwrite=True)
        summaries = {
            "step": record.step, "stage": record.stage, "rank": record.rank,
            "activations": {k: v.to_dict() for k, v in record.activations.items()},
            "gradients": {k: v.to_dict() for k, v in record.gradients.items()},
            "parameter_gradients": {k: v.to_dict() for k, v in record.parameter_gradients.items()},
            # the update's gradient norm, after and before clipping (None: no update was seen)
            "grad_norm": record.grad_norm,
            "grad_norm_before_clip": record.grad_norm_before_clip,
            "clip_coefficient": record.clip_coefficient,
            "skipped": [[kind, name, why] for (kind, name), why in record.skipped.items()],
        }
        temporary = folder / f".{STEP_SUMMARIES}.tmp"
        temporary.write_text(json.dumps(summaries))
        temporary.replace(folder / STEP_SUMMARIES)  # last: a step folder with it is complete

    def write_anomaly(self, report: AnomalyReport) -> None:
        """Writes the anomaly report as ``anomaly.json`` in the folder of its step."""
        folder = self.root / step_folder_name(report.step or 0)
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / ".anomaly.json.tmp"
        temporary.write_text(json.dumps(report.to_dict(), indent=1))
        temporary.replace(folder / "anomaly.json")

    def close(self) -> None:
        """Nothing to release: every capture is complete on disk when ``write`` returns."""
