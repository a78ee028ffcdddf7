"""Hands records to the writers, on the training thread or on a background one.

Why a module of its own: a writer's failure or slowness is the writers' business, not the
training loop's. Every writer gets every record whatever another writer does; failures are
reported on the training thread (warnings, or, with ``strict``, the first error raised once
every writer has had the record); with ``background`` the writes run on one writer thread
fed by a bounded queue, so that training does not wait for them.

A write that takes longer than ``write_timeout`` is reported with a warning naming the writer:
in the background while training goes on (at the next call of the driver on the training
thread), synchronously once it returns. When the queue is full (a hung or slow writer), the
oldest queued record is dropped with a warning: training never waits for a writer, and the
memory records hold stays bounded.
"""

from __future__ import annotations

import collections
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn

from lens_callbacks.record import CaptureRecord
from lens_callbacks.writers.base import Writer

# One write: the writer and the call that hands it the record (or an anomaly report).
Call = tuple[Writer, Callable[[], None]]


@dataclass(frozen=True)
class _Batch:
    """The writes of one record, in writer order."""

    step: int | None
    calls: Sequence[Call]


@dataclass(frozen=True)
class _Failure:
    writer: str
    step: int | None
    error: Exception


class Delivery:
    """Delivers the records of one ``Lens`` to its writers (see the module docstring).

    Args:
        strict: raise the first writer error (after every writer has had the record).
        background: write on a writer thread; otherwise on the calling thread.
        write_timeout: seconds after which a write is reported as slow or hung (None: never).
        max_queued: records waiting for the writer thread, at most (the one being written
            is not counted); beyond, the oldest is dropped.
    """

    def __init__(
        self, *, strict: bool, background: bool, write_timeout: float | None, max_queued: int
    ) -> None:
        self.strict = strict
        self.background = background
        self.write_timeout = write_timeout
        self.max_queued = max_queued
        self._queue: collections.deque[_Batch] = collections.deque()
        self._ready = threading.Condition()
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._failures: collections.deque[_Failure] = collections.deque()
        self._current: tuple[str, int | None, float] | None = None  # writer, step, start
        self._warned_hung: tuple[str, int | None, float] | None = None

    def deliver(self, step: int | None, calls: Sequence[Call]) -> None:
        """Hands one record's writes over; raises a strict failure on the training thread."""
        batch = _Batch(step, calls)
        if not self.background:
            self._run(batch)
            self.report()
            return
        with self._ready:
            if len(self._queue) >= self.max_queued:
                dropped = self._queue.popleft()
                busy = self._current[0] if self._current is not None else "a writer"
                warnings.warn(
                    f"lens_callbacks: the capture of step {dropped.step} is dropped unwritten: "
                    f"{self.max_queued} captures are waiting for {busy}, which is still writing "
                    "(raise max_queued to keep more in memory).",
                    RuntimeWarning,
                    stacklevel=4,
                )
            self._queue.append(batch)
            self._ready.notify_all()
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._work, name="lens-writer", daemon=True)
                self._thread.start()
        self.report()

    def flush(self, raise_errors: bool = True) -> None:
        """Waits until every queued record is written, then reports the failures."""
        with self._ready:
            while self._queue or self._busy:
                self._ready.wait(self.write_timeout)
                self._warn_hung(stacklevel=5)
        self.report(raise_errors)

    def close(self) -> None:
        """Flushes and stops the writer thread (a later record starts another)."""
        try:
            self.flush()
        finally:
            thread, self._thread = self._thread, None
            if thread is not None:
                with self._ready:
                    self._stopping = True
                    self._ready.notify_all()
                thread.join()

    def report(self, raise_errors: bool = True) -> None:
        """On the training thread: warns about a hung write, then warns about (or, ``strict``,
        raises the first of) the failures seen since the last report. ``raise_errors=False``:
        only warns (another error is being handled)."""
        self._warn_hung(stacklevel=5)
        first: Exception | None = None
        while self._failures:
            failure = self._failures.popleft()
            if self.strict and raise_errors and first is None:
                first = failure.error
                continue
            warnings.warn(
                f"lens_callbacks: {failure.writer} failed to write step {failure.step} "
                f"({type(failure.error).__name__}: {failure.error}); training goes on"
                f"{'' if self.strict else ' (strict=True stops it)'}.",
                RuntimeWarning,
                stacklevel=4,
            )
        if first is not None:
            raise first

    def _warn_hung(self, stacklevel: int) -> None:
        current = self._current
        if current is None or self.write_timeout is None or current == self._warned_hung:
            return
        writer, step, start = current
        if time.monotonic() - start > self.write_timeout:
            self._warned_hung = current
            warnings.warn(
                f"lens_callbacks: {writer} has been writing step {step} for more than "
                f"write_timeout={self.write_timeout:g} s; training goes on, and later captures "
                f"wait in a queue of {self.max_queued} (the oldest dropped beyond).",
                RuntimeWarning,
                stacklevel=stacklevel,
            )

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._stopping:
                    self._ready.wait()
                if not self._queue:
                    return
                batch = self._queue.popleft()
                self._busy = True
            try:
                self._run(batch)
            finally:
                with self._ready:
                    self._busy = False
                    self._ready.notify_all()

    def _run(self, batch: _Batch) -> None:
        """Every writer gets the record; failures are kept for :meth:`report`."""
        for writer, call in batch.calls:
            name = type(writer).__name__
            start = time.monotonic()
            self._current = (name, batch.step, start)
            try:
                call()
            except Exception as error:
                self._failures.append(_Failure(name, batch.step, error))
            finally:
                self._current = None
            elapsed = time.monotonic() - start
            if not self.background and self.write_timeout is not None and elapsed > self.write_timeout:
                warnings.warn(
                    f"lens_callbacks: {name} took {elapsed:.1f} s to write step {batch.step} "
                    f"(more than write_timeout={self.write_timeout:g} s) while training waited; "
                    "Lens(background=True) writes off the training thread.",
                    RuntimeWarning,
                    stacklevel=5,
                )

def _storage_key(tensor: torch.Tensor) -> tuple[torch.device, int] | None:
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (meta, DTensor...)
        return None
    return (tensor.device, pointer) if pointer else None


def own_tensors(record: CaptureRecord, model: nn.Module) -> None:
    """Copies the record's saved tensors that share memory with the model's parameters, buffers
    or ``.grad``, so that a writer on another thread reads them as the step left them, not as
    the next updates change them in place. The rest are the step's own outputs, which later
    steps do not write to."""
    state = {
        key for tensor in chain(model.parameters(), model.buffers(),
                                (p.grad for p in model.parameters() if p.grad is not None))
        if (key := _storage_key(tensor)) is not None
    }
    with torch._C.DisableTorchFunction(), torch.no_grad():
        for history in record.histories:
            for layer in history.layer_list:
                saved = layer.saved_tensor
                if saved is not None and _storage_key(saved) in state:
                    layer.saved_tensor = saved.clone()
                slot = layer.gradient_slot
                if slot is not None and slot.value is not None and _storage_key(slot.value) in state:
                    slot.value = slot.value.clone()
