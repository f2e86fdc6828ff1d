from __future__ import annotations

from pathlib import Path

import pytest

from flcore.durable import DurableWriter
from flcore.errors import FLCoreError


def test_batches_are_written_in_order_and_complete_after_wait(tmp_path: Path) -> None:
    writer = DurableWriter()
    writer.submit([(tmp_path / "a" / "model", b"1" * 1000), (tmp_path / "checkpoint", b"r1")])
    writer.submit([(tmp_path / "a" / "model", b"2" * 1000), (tmp_path / "checkpoint", b"r2")])
    writer.wait()
    assert (tmp_path / "a" / "model").read_bytes() == b"2" * 1000
    assert (tmp_path / "checkpoint").read_bytes() == b"r2"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["model"]  # no temp files


def test_a_failed_write_is_reported_at_the_next_wait(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a folder should be")
    writer = DurableWriter()
    writer.submit([(tmp_path / "blocker" / "model", b"x")])
    with pytest.raises(FLCoreError, match="writing the round's files failed"):
        writer.wait()
    writer.wait()  # reported once
