"""``best_model.safetensors`` and ``best_model.json``: written atomically, restorable.

Each file is written to a temporary file that is fsynced and renamed over the old one, so a
crash leaves the previous best or the new one, never half of one. The JSON names the SHA-256
of the model file it describes, so a reader can tell if a crash fell between the two renames.

The files live outside ``ctx``, so the core's rollback cannot restore them. At a round's
first write, what they held at the round's start keeps a second name, a hard link
(``.best_model.safetensors.round-start``): no copy of the model in memory or on disk, since
the atomic write gives the file a new inode and leaves the old one to the link. A failed
round renames it back; a completed round drops it. A process that dies mid-round leaves the
round-start files beside the new ones. ``version`` counts the writes; the selection in
``ctx.state`` carries the same count, which is how a stale pair of files is recognised after
a rollback the plugin did not see.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import torch

MODEL_FILE: Final = "best_model.safetensors"
RECORD_FILE: Final = "best_model.json"
ROUND_START: Final = ".round-start"


def round_start_path(path: Path) -> Path:
    """Where ``path``'s content at the round's start is kept while the round runs."""
    return path.with_name(f".{path.name}{ROUND_START}")


class BestModelFiles:
    """The best-model files of one run directory (none when ``run_dir`` is ``None``)."""

    def __init__(self, run_dir: Path | None) -> None:
        self.run_dir = run_dir
        self.version = 0
        #: ``(version, path -> whether it existed)`` as at the round's first write; ``None``
        #: when nothing was written since the last :meth:`commit`.
        self._undo: tuple[int, dict[Path, bool]] | None = None

    @property
    def model_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / MODEL_FILE

    @property
    def record_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / RECORD_FILE

    @property
    def paths(self) -> tuple[Path, ...]:
        """The record first: restored or removed first, a crash in between leaves a record
        whose SHA-256 does not match the model."""
        if self.run_dir is None:
            return ()
        return (self.run_dir / RECORD_FILE, self.run_dir / MODEL_FILE)

    @property
    def pending(self) -> bool:
        """Whether something was written since the last :meth:`commit`."""
        return self._undo is not None

    def write(
        self,
        weights: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
        record: Mapping[str, Any],
    ) -> int:
        """Write the model, then its record; return the new version."""
        from flcore import encode_tensors, write_atomic

        payload = bytes(encode_tensors(weights, meta))
        described = {**record, "file": MODEL_FILE, "sha256": hashlib.sha256(payload).hexdigest()}
        text = json.dumps(described, indent=2, allow_nan=False) + "\n"  # fails before writing
        if self._undo is None:
            self._undo = (self.version, self._keep_round_start())
        self.version += 1
        if self.run_dir is not None:
            write_atomic(self.run_dir / MODEL_FILE, payload)
            write_atomic(self.run_dir / RECORD_FILE, text.encode())
        return self.version

    def commit(self) -> None:
        """The round that wrote is complete: its files stay, the round-start ones go."""
        if self._undo is not None:
            for path in self.paths:
                round_start_path(path).unlink(missing_ok=True)
        self._undo = None

    def restore(self) -> int | None:
        """Put the files back as they were at the round's first write; return that version,
        or ``None`` when nothing was written since the last commit."""
        if self._undo is None:
            return None
        version, existed = self._undo
        for path in self.paths:
            if existed[path]:
                kept = round_start_path(path)
                os.replace(kept, path)
                # renaming a hard link over its own file does nothing: it was never replaced
                kept.unlink(missing_ok=True)
            else:
                path.unlink(missing_ok=True)
        self.version = version
        self._undo = None
        return version

    def _keep_round_start(self) -> dict[Path, bool]:
        from flcore import write_atomic

        existed = {}
        for path in self.paths:
            kept = round_start_path(path)
            kept.unlink(missing_ok=True)  # stale: from a process that died mid-round
            existed[path] = path.exists()
            if not existed[path]:
                continue
            try:
                os.link(path, kept)
            except OSError:  # a file system without hard links: a copy, written atomically
                write_atomic(kept, path.read_bytes())
        return existed
