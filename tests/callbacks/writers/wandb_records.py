"""Reads back what an offline W&B run wrote: the records of ``wandb/offline-run-*/run-<id>.wandb``.

wandb 0.31 ships no Python reader, so this is one. The file is a 7-byte header (``:W&B``,
magic ``0xBEE1`` little-endian, version 0) followed by a LevelDB-style log: 32 KiB blocks of
fragments, each with a 7-byte header (CRC-32 of the type byte and the data, as zlib computes
it (IEEE, not CRC-32C); 2-byte little-endian length; 1-byte type FULL=1, FIRST=2, MIDDLE=3,
LAST=4). A block's last bytes, too few for a header, are zero padding. Block offsets count from
the start of the file, W&B header included. Each reassembled payload is a serialized
``wandb_internal_pb2.Record``.

An offline run uploads no artifact: each manifest entry's ``local_path`` is the copy W&B staged
(under ``WANDB_DATA_DIR/artifacts/staging/``) for a later ``wandb sync``; :func:`artifact_folder`
lays those copies out as ``artifact.download()`` would.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

__all__ = [
    "artifact_folder", "artifacts", "finished_records", "history_rows", "metrics", "read_records", "run_file",
]

FILE_HEADER = struct.Struct("<4sHB")
IDENT, MAGIC, VERSION = b":W&B", 0xBEE1, 0
FRAGMENT_HEADER = struct.Struct("<IHB")
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def run_file(root: str | Path) -> Path:
    """The record file of the one offline run under ``root`` (``root/wandb/offline-run-*/``)."""
    found = sorted(Path(root).glob("**/offline-run-*/run-*.wandb"))
    if len(found) != 1:
        raise AssertionError(f"expected one offline run record file under {root}, found {found}")
    return found[0]


def _payloads(data: bytes) -> list[bytes]:
    ident, magic, version = FILE_HEADER.unpack_from(data)
    if (ident, magic, version) != (IDENT, MAGIC, VERSION):
        raise ValueError(f"not a W&B record file: header {ident!r} {magic:#x} {version}")
    payloads: list[bytes] = []
    pending: bytearray | None = None
    position = FILE_HEADER.size
    while position < len(data):
        left = BLOCK - position % BLOCK
        if left < FRAGMENT_HEADER.size:  # zero padding at the end of a block
            position += left
            continue
        checksum, length, kind = FRAGMENT_HEADER.unpack_from(data, position)
        start = position + FRAGMENT_HEADER.size
        fragment = data[start:start + length]
        if length > left - FRAGMENT_HEADER.size or len(fragment) != length:
            raise ValueError(f"fragment at {position} of {length} bytes overruns its block or the file")
        if zlib.crc32(fragment, zlib.crc32(bytes([kind]))) != checksum:
            raise ValueError(f"CRC mismatch in the fragment at {position}")
        position = start + length
        if kind == FULL and pending is None:
            payloads.append(fragment)
        elif kind == FIRST and pending is None:
            pending = bytearray(fragment)
        elif kind in (MIDDLE, LAST) and pending is not None:
            pending += fragment
            if kind == LAST:
                payloads.append(bytes(pending))
                pending = None
        else:
            raise ValueError(f"fragment of type {kind} at {position} out of sequence")
    if pending is not None:
        raise ValueError("the file ends inside a record")
    return payloads


def read_records(path: str | Path) -> list[pb.Record]:
    """Every record of a ``run-<id>.wandb`` file, in order."""
    records = []
    for payload in _payloads(Path(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def finished_records(root: str | Path, timeout: float = 30.0) -> list[pb.Record]:
    """The records of the one offline run under ``root``, once its ``exit`` record is on disk.

    ``run.finish()`` returns before the wandb service has flushed its last buffered block, so
    a file read right away can end inside a record: wait until the whole run is there.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = read_records(run_file(root))
            if records and records[-1].WhichOneof("record_type") == "exit":
                return records
        except (AssertionError, ValueError):
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"the run under {root} has no exit record after {timeout} s")
        time.sleep(0.05)


def history_rows(records: list[pb.Record]) -> list[dict[str, Any]]:
    """The logged rows, values decoded from JSON; ``{"h": {"_type": ...}}`` for nested keys."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            path = list(item.nested_key) or [item.key]
            target = row
            for part in path[:-1]:
                target = target.setdefault(part, {})
            target[path[-1]] = json.loads(item.value_json)
        rows.append(row)
    return rows


def artifacts(records: list[pb.Record]) -> list[pb.ArtifactRecord]:
    return [record.artifact for record in records if record.WhichOneof("record_type") == "artifact"]


def metrics(records: list[pb.Record]) -> list[pb.MetricRecord]:
    return [record.metric for record in records if record.WhichOneof("record_type") == "metric"]


def artifact_folder(artifact: pb.ArtifactRecord, into: str | Path) -> Path:
    """The files of a logged artifact under ``into``, at their paths in the artifact.

    Each staged copy is checked against its manifest entry (size, base64 MD5 digest), as a
    download is checked.
    """
    root = Path(into)
    for entry in artifact.manifest.contents:
        data = Path(entry.local_path).read_bytes()
        digest = base64.b64encode(hashlib.md5(data).digest()).decode()
        if (len(data), digest) != (entry.size, entry.digest):
            raise ValueError(f"the staged copy of {entry.path} ({entry.local_path}) is not the manifest's")
        target = root / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root
