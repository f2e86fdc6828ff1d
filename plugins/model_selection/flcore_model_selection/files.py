"""``best_model.safetensors`` and ``best_model.json``: written atomically, restorable.

Each file is written to a temporary file that is fsynced and renamed over the old one, so a
crash leaves the previous best or the new one, never half of one. The JSON names the SHA-256
of the model file it describes, so a reader can tell if a crash fell between the two renames.

The files live outside ``ctx``, so the core's rollback cannot restore them: what they held
at the round's start is kept in memory at the round's first write, and put back when the
round fails. ``version`` counts the writes; the selection in ``ctx.state`` carries the same
count, which is how a stale pair of files is recognised after a rollback the plugin did not
see.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import torch

MODEL_FILE: Final = "best_model.safetensors"
RECORD_FILE: Final = "best_model.json"


class BestModelFiles:
    """The best-model files of one run directory (none when ``run_dir`` is ``None``)."""

    def __init__(self, run_dir: Path | None) -> None:
        self.run_dir = run_dir
        self.version = 0
        #: ``(version, path -> bytes or None)`` as at the round's first write; ``None`` when
        #: nothing was written since the last :meth:`commit`.
        self._undo: tuple[int, dict[Path, bytes | None]] | None = None

    @property
    def model_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / MODEL_FILE

    @property
    def record_path(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / RECORD_FILE

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
        from flcore import codec

        payload = codec.encode(weights, meta)
        described = {**record, "file": MODEL_FILE, "sha256": hashlib.sha256(payload).hexdigest()}
        text = json.dumps(described, indent=2, allow_nan=False) + "\n"  # fails before writing
        if self._undo is None:
            self._undo = (self.version, self._contents())
        self.version += 1
        if self.run_dir is not None:
            codec.write_atomic(self.run_dir / MODEL_FILE, bytes(payload))
            codec.write_atomic(self.run_dir / RECORD_FILE, text.encode())
        return self.version

    def commit(self) -> None:
        """The round that wrote is complete: its files stay."""
        self._undo = None

    def restore(self) -> int | None:
        """Put the files back as they were at the round's first write; return that version,
        or ``None`` when nothing was written since the last commit."""
        from flcore import codec

        if self._undo is None:
            return None
        version, contents = self._undo
        # the record first: a crash in between leaves a record whose sha256 no longer matches
        for path in sorted(contents, key=lambda p: p.name != RECORD_FILE):
            data = contents[path]
            if data is None:
                path.unlink(missing_ok=True)
            else:
                codec.write_atomic(path, data)
        self.version = version
        self._undo = None
        return version

    def _contents(self) -> dict[Path, bytes | None]:
        contents: dict[Path, bytes | None] = {}
        for path in (self.model_path, self.record_path):
            if path is not None:
                contents[path] = path.read_bytes() if path.exists() else None
        return contents
