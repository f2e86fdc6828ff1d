from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import pytest

from flcore.durable import StorageError
from flcore.logging import check_log_file, close_logger, make_logger


def test_every_event_goes_to_the_file_and_warnings_to_the_console(tmp_path: Path) -> None:
    console = io.StringIO()
    log = make_logger(tmp_path / "events.jsonl", console=console).bind(job="j")
    log.debug("fired", hook="start_round")
    log.warning("contribution_refused", reason="NaN")
    close_logger(log)
    lines = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(x["event"], x["level"], x["job"]) for x in lines] == [
        ("fired", "debug", "j"),
        ("contribution_refused", "warning", "j"),
    ]
    assert "contribution_refused" in console.getvalue() and "fired" not in console.getvalue()


def test_the_console_can_speak_json(tmp_path: Path) -> None:
    console = io.StringIO()
    log = make_logger(None, console_format="json", console_level="info", console=console)
    log.info("round_end", round=3)
    assert json.loads(console.getvalue())["round"] == 3


def test_each_event_is_one_write_of_a_whole_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[bytes] = []
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    log = make_logger(tmp_path / "events.jsonl", console=io.StringIO())
    monkeypatch.setattr(os, "write", write)
    log.info("round_end", round=1, text="x" * 100_000)
    log.info("round_end", round=2)
    close_logger(log)
    assert [json.loads(w)["round"] for w in writes] == [1, 2]
    assert all(w.endswith(b"\n") and w.count(b"\n") == 1 for w in writes)
    assert (tmp_path / "events.jsonl").read_bytes() == b"".join(writes)


def test_a_full_disk_leaves_the_file_as_it_was_and_is_reported_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "events.jsonl"
    console = io.StringIO()
    log = make_logger(path, console=console).bind(job="j")
    log.info("round_end", round=1)
    check_log_file(log)  # nothing failed yet
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    log.warning("round_end", round=2)  # never raises into the code that logs
    monkeypatch.setattr(os, "write", real_write)
    log.warning("round_end", round=3)  # the file is not written after a failure: no gaps
    with pytest.raises(StorageError, match=f"^cannot write {path}: No space left on device$"):
        check_log_file(log.bind(more="context"))
    assert [json.loads(x)["round"] for x in path.read_text().splitlines()] == [1]
    assert "round=2" in console.getvalue() and "round=3" in console.getvalue()
    close_logger(log)


def test_a_logger_without_a_file_has_nothing_to_report() -> None:
    log = make_logger(None, console=io.StringIO())
    log.info("x")
    check_log_file(log)
    check_log_file(object())  # a logger that is not flcore's
    close_logger(log)
