"""The tensor file of a loaded capture: its header checked before any tensor is read.

``tensors.safetensors`` is read here rather than by the safetensors library, so that nothing in
it is used before it is checked. Loading reads the header (8 bytes of length, then JSON) within
:data:`MAX_HEADER_BYTES` and checks it against the file and against ``history.json``: every
tensor's dtype and shape are the ones its layer declares, its byte range has exactly the size
they make, and the ranges tile the data section from its first byte to the file's last. So no
tensor is read that is larger than its layer says, or than the file is. Reading a tensor then
allocates its own size once (the file is never mapped whole) and checks its bytes against the
SHA-256 digest ``history.json`` keeps of them; captures saved before digests were kept (their
``history.json`` has no ``tensor_sha256``) load without that check.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lens_core.store._files import open_regular, parse_json, read_all, refused
from lens_core.store._layout import HISTORY, MAX_HEADER_BYTES, TENSORS, CaptureFormatError, corrupted

# safetensors' dtype codes, by the name of the torch dtype (some exist in newer torch only).
_CODES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
    "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16",
    "F32": "float32", "F64": "float64", "C64": "complex64", "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2": "float8_e5m2", "F8_E5M2FNUZ": "float8_e5m2fnuz",
}
_DTYPES = {code: dtype for code, name in _CODES.items()
           if isinstance(dtype := getattr(torch, name, None), torch.dtype)}
MAX_DIMS = 64
"""Most dimensions a stored shape may have (a shape is checked before anything is sized by it)."""
_MAX_INT = 2**63 - 1  # sizes and offsets are int64 in torch and u64 in safetensors


def check_shape(shape: Any) -> tuple[int, ...]:
    """``shape`` (from a file) as a tuple of sizes, each one an int64, at most :data:`MAX_DIMS`.

    Raises:
        TypeError, ValueError: it is no such list.
    """
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise TypeError(f"shape {shape!r:.80} is not a list of at most {MAX_DIMS} sizes")
    if not all(type(size) is int and 0 <= size <= _MAX_INT for size in shape):
        raise ValueError(f"shape {shape!r:.80} holds a size that is not an int from 0 to 2**63 - 1")
    return tuple(shape)


@dataclass(frozen=True, slots=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    """Offset of the first byte in the file."""
    size: int


@dataclass(frozen=True, slots=True)
class _Header:
    identity: tuple[int, int, int, int]
    """``st_dev, st_ino, st_size, st_mtime_ns`` of the file it was read from."""
    entries: dict[str, _Entry]
    capture_id: str | None


class TensorFile:
    """``tensors.safetensors`` of one loaded capture, shared by all its lazy tensors.

    Args:
        root: the capture's folder.
        capture_id: the id of ``history.json``, which the file's metadata must carry.
        device: where read tensors go.
    """

    def __init__(self, root: Path, capture_id: str, device: str) -> None:
        self.root = root
        self.capture_id = capture_id
        self.device = device
        self.expected: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        """Key -> dtype and shape ``history.json`` declares, for every tensor the file must hold."""
        self.digests: dict[str, str] | None = None
        """Key -> SHA-256 of the tensor's bytes; None for captures saved without digests."""
        self._header: _Header | None = None

    def check(self) -> None:
        """Reads and checks the header now, so that a bad file fails ``load``, not a later read.

        Raises:
            CaptureFormatError: the file is missing, not a regular file, or its header does not
                describe exactly the tensors ``history.json`` declares, laid out in the file.
        """
        file, opened = self._open(f"{TENSORS} is missing")
        with file:
            self._header = self._checked_header(file, opened, "")

    def read(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key``, checked against its digest, on :attr:`device`.

        Raises:
            CaptureFormatError: the file changed since loading (another capture, damaged, cut
                short), the tensor's bytes do not match their digest, or it does not fit in memory.
        """
        why = f"tensor {key!r} cannot be read"
        file, opened = self._open(f"{why}: {TENSORS} is missing (removed after the history was loaded)")
        with file:
            header = self._header
            if header is None or header.identity != _identity(opened):  # rewritten since load
                header = self._header = self._checked_header(file, opened, key)
            entry = header.entries[key]
            try:
                data = read_all(file, self.root / TENSORS, entry.size, entry.start)
            except MemoryError:
                raise refused(
                    self.root / TENSORS, f"holds tensor {key!r} of {entry.size:,} bytes ({entry.dtype}, "
                    f"{entry.shape}), more memory than this process can allocate",
                    "read it where more memory is free, or read other layers only",
                ) from None
        digest = None if self.digests is None else self.digests[key]
        if digest is not None and hashlib.sha256(data).hexdigest() != digest:
            raise corrupted(self.root, f"the bytes of tensor {key!r} in {TENSORS} do not match their SHA-256 "
                                       f"digest in {HISTORY} (flipped or overwritten after the save)")
        if entry.size == 0:  # frombuffer refuses empty buffers
            tensor = torch.empty(entry.shape, dtype=entry.dtype)
        else:
            tensor = torch.frombuffer(data, dtype=entry.dtype).reshape(entry.shape)
        # Moved by torch: any device torch knows works (meta, xpu...).
        return tensor if self.device == "cpu" else tensor.to(self.device)

    def _open(self, missing: str) -> tuple[io.FileIO, os.stat_result]:
        try:
            return open_regular(self.root, TENSORS)
        except FileNotFoundError:
            raise corrupted(self.root, missing) from None

    def _checked_header(self, file: io.FileIO, opened: os.stat_result, reading: str) -> _Header:
        """The file's header, checked to describe exactly the expected tensors, laid out in the file.

        ``reading`` is the key being read when the file changed after loading, else empty.
        """
        header = _read_header(self.root, file, opened)
        if header.capture_id != self.capture_id:
            if reading:
                raise CaptureFormatError(
                    f"{self.root / TENSORS} was replaced by another capture after this history was loaded, "
                    f"so {reading!r} is not this history's any more; load {self.root} again."
                )
            raise corrupted(self.root, f"{TENSORS} belongs to another capture than {HISTORY}")
        missing = [key for key in self.expected if key not in header.entries]
        if missing:
            raise corrupted(self.root, f"{TENSORS} lacks {len(missing)} tensors ({', '.join(missing[:5])})")
        unknown = [key for key in header.entries if key not in self.expected]
        if unknown:
            raise corrupted(self.root, f"{TENSORS} holds {len(unknown)} tensors that {HISTORY} does not "
                                       f"declare ({', '.join(map(repr, unknown[:5]))})")
        for key, (dtype, shape) in self.expected.items():
            entry = header.entries[key]
            if entry.dtype != dtype or entry.shape != shape:
                stored, declared = _describe(entry.dtype, entry.shape), _describe(dtype, shape)
                raise corrupted(self.root, f"{TENSORS} holds {key!r} as {stored} where {HISTORY} declares "
                                           f"{declared}")
        return header


def _identity(opened: os.stat_result) -> tuple[int, int, int, int]:
    return opened.st_dev, opened.st_ino, opened.st_size, opened.st_mtime_ns


def _describe(dtype: torch.dtype, shape: tuple[int, ...]) -> str:
    return f"{str(dtype).removeprefix('torch.')} {list(shape)}"


def _read_header(root: Path, file: io.FileIO, opened: os.stat_result) -> _Header:
    """The header of the safetensors file ``file``, checked against the file alone."""
    path, size = root / TENSORS, opened.st_size
    if size < 8:
        raise corrupted(root, f"{TENSORS} is {size} bytes, too short for a safetensors file")
    length = int.from_bytes(read_all(file, path, 8), "little")
    if length > min(size - 8, MAX_HEADER_BYTES):
        where = "the file holds" if length > size - 8 else f"the {MAX_HEADER_BYTES:,} bytes loading reads"
        raise corrupted(root, f"{TENSORS} declares a header of {length:,} bytes, more than {where}")
    document = parse_json(root, f"the header of {TENSORS}", read_all(file, path, length, 8))
    if not isinstance(document, dict):
        raise corrupted(root, f"the header of {TENSORS} is not a JSON object")
    metadata = document.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupted(root, f"the __metadata__ of {TENSORS} is not an object of strings")
    start = 8 + length
    entries = {key: _entry(root, key, spec, start) for key, spec in document.items()}
    end = start
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.size)):
        if entry.start != end:
            raise corrupted(root, f"the tensors in {TENSORS} overlap or leave gaps (a tensor starts at byte "
                                  f"{entry.start - start:,} of the data, where the one before it ended at "
                                  f"{end - start:,})")
        end += entry.size
    if end != size:
        raise corrupted(root, f"{TENSORS} holds {size - start:,} bytes of tensor data where its header "
                              f"declares {end - start:,}")
    return _Header(_identity(opened), entries, metadata.get("capture_id"))


def _entry(root: Path, key: str, spec: Any, start: int) -> _Entry:
    def wrong(why: str) -> CaptureFormatError:
        return corrupted(root, f"the header of {TENSORS} describes tensor {key!r:.200} wrongly ({why})")

    if not isinstance(spec, dict):
        raise wrong("not an object")
    code = spec.get("dtype")
    dtype = _DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise wrong(f"dtype {code!r:.80} is not one this torch has")
    try:
        shape = check_shape(spec.get("shape"))
    except (TypeError, ValueError) as error:
        raise wrong(str(error)) from None
    offsets = spec.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(n) is int and 0 <= n <= _MAX_INT for n in offsets) or offsets[0] > offsets[1]):
        raise wrong(f"data_offsets {offsets!r:.80} are not two offsets, first to last")
    size = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != size:
        raise wrong(f"its {size:,} bytes as {_describe(dtype, shape)} do not fill data_offsets {offsets}")
    return _Entry(dtype, shape, start + offsets[0], size)
