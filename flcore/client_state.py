"""Where a client keeps its per-client state across rounds, on its own disk.

A client that is killed and restarted must continue from the state of the round the server
resumes from, not from its latest: the state after round ``r`` is kept as
``state-{r:06d}.safetensors`` (:mod:`flcore.saved_state`), and a round reads the newest
state saved before it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from flcore import saved_state
from flcore.errors import CodecError

_NAME = re.compile(r"state-(\d{6,})\.safetensors")


class ClientStateStore:
    """One client's state files in ``directory``, created on the first :meth:`save`."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def save(self, round: int, value: Any) -> None:
        """Keep ``value`` as the state after ``round``, then delete what no resume can need.

        The server writes its checkpoint in the background, so when round ``round``'s
        request came it may have committed only round ``round - 2``: a resume then reads
        the newest state saved at or before ``round - 2``. That file and every later one are
        kept; older files can only serve a round the server will never repeat."""
        if round < 0:
            raise ValueError(f"round must be >= 0, got {round}")
        saved_state.save(self._path(round), value, {"round": round})
        rounds = self._rounds()
        oldest = max((r for r in rounds if r <= round - 2), default=None)
        if oldest is None:
            return
        for r in rounds:
            if r < oldest:
                self._path(r).unlink(missing_ok=True)

    def load(self, before_round: int) -> Any | None:
        """The state saved by the newest round before ``before_round``, or ``None``.

        Files of ``before_round`` and later are ignored: they were written in a round the
        server never committed, and it repeats that round from the earlier state."""
        earlier = [r for r in self._rounds() if r < before_round]
        if not earlier:
            return None
        newest = max(earlier)
        path = self._path(newest)
        value, meta = saved_state.load(path)
        if meta != {"round": newest}:  # copied or renamed by hand: not that round's state
            raise CodecError(f"{str(path)!r}: records {meta!r}, not round {newest}")
        return value

    def _path(self, round: int) -> Path:
        return self.directory / f"state-{round:06d}.safetensors"

    def _rounds(self) -> list[int]:
        """The rounds that have a state file; files of any other name are not ours."""
        if not self.directory.is_dir():
            return []
        rounds = []
        for path in self.directory.iterdir():
            match = _NAME.fullmatch(path.name)
            # one file per round: "state-0000003" is no name save() gives round 3
            if match and path.name == self._path(int(match[1])).name:
                rounds.append(int(match[1]))
        return sorted(rounds)
