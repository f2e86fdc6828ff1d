"""Durable writes off the training's critical path.

A committed round's files must reach the disk (fsync, then an atomic rename), which costs
milliseconds per round on a real disk. The next round need not wait for it: one batch of
files is written on a background thread while training goes on; the next commit, a
rollback that re-reads the model, and the end of the run wait for it first. A crash while
a batch is in flight leaves the previous round's files, and a resumed run repeats that
round to the same bytes.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from flcore.codec import write_atomic
from flcore.errors import FLCoreError


class DurableWriter:
    """Writes batches of ``(path, data)`` atomically, in order, one batch at a time.

    One thread, started with the first batch and kept until :meth:`close`: starting a thread
    per round cost more than handing it a batch (80 us against 20 us, measured)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def submit(self, files: Sequence[tuple[Path, bytes | bytearray]]) -> None:
        """Start writing ``files`` once the previous batch is on disk."""
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="flcore-durable-writer")
            # a writer dropped without close() (a Training never run) stops its thread too
            weakref.finalize(self, self._pool.shutdown, wait=False)
        self._pending = self._pool.submit(_write, list(files))

    def wait(self) -> None:
        """Block until the batch in flight is on disk; raise if writing it failed."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except BaseException as err:  # reported here, in the training's thread, once
            raise FLCoreError(
                f"writing the round's files failed: {type(err).__name__}: {err}"
            ) from err

    def close(self) -> None:
        """:meth:`wait`, then stop the thread (a later batch starts another)."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None


def _write(files: list[tuple[Path, bytes | bytearray]]) -> None:
    for path, data in files:
        write_atomic(path, data)
