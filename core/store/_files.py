"""Opening the files of a capture as untrusted input: regular files only, read within limits.

Captures travel (W&B artifacts, shared run folders, a colleague's bug report), so a folder may
hold anything under a capture's file names: a symbolic link to ``/etc/passwd`` or ``/dev/zero``,
a FIFO that blocks the reader forever, a file of gigabytes, JSON nested 100,000 levels deep or
made of millions of empty lists (each a Python object once parsed).
Every file of a capture is opened here, without following a link and without blocking, and
judged by ``fstat`` of the very file opened before one byte is read; a problem is a
:class:`CaptureFormatError` that names the file and what is wrong with it.
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
from pathlib import Path
from typing import Any

from lens_core.store._layout import (
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    MAX_JSON_VALUES,
    CaptureFormatError,
    corrupted,
)

# O_NOFOLLOW: a link is refused by the open itself, even one swapped in after the lstat;
# O_NONBLOCK: opening a FIFO returns at once (and fstat then refuses it) instead of waiting for
# a writer. Both are POSIX; elsewhere the lstat before the open is the check.
_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
          | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
_KINDS = (
    (stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"),
)


def refused(path: Path, why: str, fix: str) -> CaptureFormatError:
    """A file that loading will not read: not because it is damaged, but because of what it is."""
    return CaptureFormatError(f"{path} {why}; {fix}")


def open_regular(root: Path, name: str) -> tuple[io.FileIO, os.stat_result]:
    """The file ``name`` of the folder ``root``, opened for reading, and its ``fstat``.

    Raises:
        FileNotFoundError: there is no ``name`` in ``root`` (the caller says what that means).
        CaptureFormatError: it is a symbolic link, a FIFO, a device or anything else than a
            regular file, or it cannot be opened.
    """
    path = root / name
    try:
        _check_kind(path, os.lstat(path))
        fd = os.open(path, _FLAGS)
    except FileNotFoundError:
        raise
    except OSError as error:
        if error.errno == errno.ELOOP:  # became a link after the lstat
            raise _link(path) from None
        raise refused(path, f"cannot be opened ({error.strerror})", "check that it is readable") from None
    try:
        opened = os.fstat(fd)
        _check_kind(path, opened)  # what was opened, whatever the lstat saw
        return io.FileIO(fd, "r", closefd=True), opened
    except BaseException:
        os.close(fd)
        raise


def read_all(file: io.FileIO, path: Path, size: int, offset: int = 0) -> bytearray:
    """``size`` bytes of ``file`` from ``offset``, into one buffer allocated once.

    Raises:
        CaptureFormatError: the file ends sooner (it shrank after its size was checked).
    """
    buffer = bytearray(size)
    view = memoryview(buffer)
    file.seek(offset)
    done = 0
    while done < size:
        count = file.readinto(view[done:])
        if not count:
            raise refused(path, f"ended after {offset + done:,} bytes where {offset + size:,} were expected",
                          "it was cut short or changed while it was read; load the capture again")
        done += count
    return buffer


def read_json(root: Path, name: str) -> Any:
    """The JSON document in the file ``name`` of ``root``, read within :data:`MAX_JSON_BYTES`.

    Raises:
        FileNotFoundError: there is no ``name`` in ``root``.
        CaptureFormatError: it is no regular file, too large, not UTF-8, not JSON, or nested
            deeper than :data:`MAX_JSON_DEPTH`.
    """
    file, opened = open_regular(root, name)
    with file:
        if opened.st_size > MAX_JSON_BYTES:
            raise refused(
                root / name, f"is {opened.st_size:,} bytes, more than the {MAX_JSON_BYTES:,} loading reads "
                "from a capture's JSON file", "it was not written by lens_core.save (or holds a capture far "
                "larger than any model's); save the history again",
            )
        data = read_all(file, root / name, opened.st_size)
    return parse_json(root, name, data)


def parse_json(root: Path, name: str, data: bytes | bytearray) -> Any:
    """``data``, the text of ``name`` in ``root``, as a JSON document of bounded size and nesting.

    Raises:
        CaptureFormatError: not UTF-8, not JSON, more values than :data:`MAX_JSON_VALUES`, nested
            deeper than :data:`MAX_JSON_DEPTH`, or more than this process can hold in memory.
    """
    # Each value but the first follows one of these (an over-count: strings may hold them too).
    values = 1 + data.count(b",") + data.count(b":") + data.count(b"[")
    if values > MAX_JSON_VALUES:
        raise corrupted(root, f"{name} holds up to {values:,} JSON values, more than the {MAX_JSON_VALUES:,} "
                              "loading parses")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise corrupted(root, f"{name} is not UTF-8 text ({error})") from None
    try:
        document = json.loads(text)
    except RecursionError:  # json's own guard, far deeper than the limit checked below
        raise _too_deep(root, name) from None
    except ValueError as error:
        raise corrupted(root, f"{name} is not valid JSON ({error})") from None
    except MemoryError:
        raise refused(root, f"needs more memory to parse its {name} than this process can allocate",
                      "open it where more memory is free") from None
    if nested_deeper(document, MAX_JSON_DEPTH):
        raise _too_deep(root, name)
    return document


def nested_deeper(document: Any, limit: int) -> bool:
    """Whether lists and objects (dicts, lists, tuples) nest more than ``limit`` levels in ``document``.

    Level by level rather than recursively, so a deep document cannot exhaust the stack here.
    """
    containers = (dict, list, tuple)
    level = [document] if isinstance(document, containers) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list[Any] = []
        for value in level:
            below += [item for item in (value.values() if isinstance(value, dict) else value)
                      if isinstance(item, containers)]
        level = below
    return False


def _too_deep(root: Path, name: str) -> CaptureFormatError:
    return corrupted(root, f"{name} nests lists or objects more than {MAX_JSON_DEPTH} levels deep")


def _check_kind(path: Path, seen: os.stat_result) -> None:
    if stat.S_ISREG(seen.st_mode):
        return
    if stat.S_ISLNK(seen.st_mode):
        raise _link(path)
    kind = next((what for test, what in _KINDS if test(seen.st_mode)), "special file")
    raise refused(path, f"is a {kind}, not a regular file: a capture holds regular files only (reading a "
                  "FIFO or a device may block or never end)", "replace it by the file saved with the capture")


def _link(path: Path) -> CaptureFormatError:
    try:
        target = f" (to {os.readlink(path)!r})"
    except OSError:
        target = ""
    return refused(
        path, f"is a symbolic link{target}, and loading follows none: it reads only the regular files "
        "inside a capture's folder, so that a capture cannot make it read any other file",
        "replace the link by a copy of the file it points to, if you trust that file",
    )
