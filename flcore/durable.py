"""Durable writes off the training's critical path.

A committed round's files must reach the disk (fsync, then an atomic rename), which costs
milliseconds per round on a real disk. The next round need not wait for it: one batch of
files is written on a background thread while training goes on; the next commit, a
rollback that re-reads the model, and the end of the run wait for it first. A crash while
a batch is in flight leaves the previous round's files, and a resumed run repeats that
round to the same bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from flcore.codec import write_atomic
from flcore.errors import FLCoreError


class DurableWriter:
    """Writes batches of ``(path, data)`` atomically, in order, one batch at a time."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, files: Sequence[tuple[Path, bytes | bytearray]]) -> None:
        """Start writing ``files`` once the previous batch is on disk."""
        self.wait()
        self._thread = threading.Thread(
            target=self._write, args=(list(files),), name="flcore-durable-writer"
        )
        self._thread.start()

    def _write(self, files: list[tuple[Path, bytes | bytearray]]) -> None:
        try:
            for path, data in files:
                write_atomic(path, data)
        except BaseException as err:  # reported by the next wait(), in the training's thread
            self._error = err

    def wait(self) -> None:
        """Block until the batch in flight is on disk; raise if writing it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise FLCoreError(f"writing the round's files failed: {type(err).__name__}: {err}")
