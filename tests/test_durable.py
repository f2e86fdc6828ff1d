from __future__ import annotations

import gc
import threading
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


def writer_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("flcore-durable-writer")}


def test_one_thread_writes_every_batch_and_close_stops_it(tmp_path: Path) -> None:
    others = writer_threads()  # of writers other tests left to the garbage collector
    writer = DurableWriter()
    for i in range(3):
        writer.submit([(tmp_path / "model", str(i).encode())])
        assert len(writer_threads() - others) == 1
    writer.close()
    assert (tmp_path / "model").read_bytes() == b"2"
    assert writer_threads() - others == set()
    writer.submit([(tmp_path / "model", b"again")])  # a closed writer starts anew
    writer.close()
    assert (tmp_path / "model").read_bytes() == b"again" and writer_threads() - others == set()


def test_a_writer_dropped_without_close_stops_its_thread(tmp_path: Path) -> None:
    others = writer_threads()
    writer = DurableWriter()
    writer.submit([(tmp_path / "model", b"x")])
    writer.wait()
    (thread,) = writer_threads() - others
    del writer
    gc.collect()
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_close_reports_a_failed_write_and_still_stops_the_thread(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a folder should be")
    others = writer_threads()
    writer = DurableWriter()
    writer.submit([(tmp_path / "blocker" / "model", b"x")])
    with pytest.raises(FLCoreError, match="writing the round's files failed"):
        writer.close()
    assert writer_threads() - others == set()
