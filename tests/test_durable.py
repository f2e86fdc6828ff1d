from __future__ import annotations

import errno
import gc
import os
import threading
from pathlib import Path

import pytest

from flcore.durable import DurableWriter, StorageError, append_to
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
    with pytest.raises(StorageError, match=f"cannot write {tmp_path / 'blocker' / 'model'}: "):
        writer.wait()
    writer.wait()  # reported once


def test_a_full_disk_names_the_file_and_leaves_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = DurableWriter()
    writer.submit([(tmp_path / "model", b"old")])
    writer.wait()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    writer.submit([(tmp_path / "checkpoint", b"new"), (tmp_path / "model", b"new")])
    with pytest.raises(StorageError) as failed:
        writer.wait()
    assert str(failed.value) == f"cannot write {tmp_path / 'checkpoint'}: No space left on device"
    assert failed.value.error.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp file, no torn file
    assert (tmp_path / "model").read_bytes() == b"old"


def test_data_may_be_made_on_the_writers_thread(tmp_path: Path) -> None:
    made_on: list[str] = []

    def checkpoint() -> bytes:
        made_on.append(threading.current_thread().name)
        return b"made late"

    writer = DurableWriter()
    writer.submit([(tmp_path / "checkpoint", checkpoint)])
    writer.close()
    assert (tmp_path / "checkpoint").read_bytes() == b"made late"
    assert made_on[0].startswith("flcore-durable-writer")


def test_a_line_is_appended_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "metrics.jsonl"
    append_to(path, b'{"round": 1}\n')
    real_write = os.write

    def half(fd: int, data: bytes) -> int:  # the disk fills during the write
        return real_write(fd, data[: len(data) // 2])

    monkeypatch.setattr(os, "write", half)
    with pytest.raises(
        StorageError, match=r"metrics\.jsonl: No space left on device \(wrote 6 of 13"
    ):
        append_to(path, b'{"round": 2}\n')

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StorageError, match=r"metrics\.jsonl: No space left on device$"):
        append_to(path, b'{"round": 2}\n')
    assert path.read_bytes() == b'{"round": 1}\n'


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
    with pytest.raises(StorageError, match="cannot write"):
        writer.close()
    assert writer_threads() - others == set()


def test_any_other_failure_is_still_reported(tmp_path: Path) -> None:
    def broken() -> bytes:
        raise ValueError("a bug")

    writer = DurableWriter()
    writer.submit([(tmp_path / "checkpoint", broken)])
    with pytest.raises(FLCoreError, match="writing the round's files failed: ValueError: a bug"):
        writer.close()
