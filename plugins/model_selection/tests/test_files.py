"""The best-model files: written atomically, described by their record, restorable to what
they held at the round's start."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from flcore_model_selection import MODEL_FILE, RECORD_FILE, BestModelFiles
from flcore_model_selection.files import round_start_path

import flcore
from flcore import load_tensors


def model(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 3), value), "b": torch.arange(3, dtype=torch.int64)}


def test_write_is_atomic_and_described(tmp_path: Path) -> None:
    files = BestModelFiles(tmp_path)
    assert files.write(model(1.0), {"round": 1}, {"round": 1, "metric": 0.5}) == 1
    payload = (tmp_path / MODEL_FILE).read_bytes()
    record = json.loads((tmp_path / RECORD_FILE).read_text())
    assert record == {
        "round": 1,
        "metric": 0.5,
        "file": MODEL_FILE,
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    weights, meta = load_tensors(tmp_path / MODEL_FILE)
    assert torch.equal(weights["w"], model(1.0)["w"]) and meta == {"round": 1}
    assert sorted(os.listdir(tmp_path)) == [RECORD_FILE, MODEL_FILE]  # no temporary left


def test_a_record_that_is_not_json_writes_nothing(
    tmp_path: Path,
) -> None:
    files = BestModelFiles(tmp_path)
    with pytest.raises(ValueError):
        files.write(model(1.0), {}, {"metric": float("nan")})  # NaN is not JSON
    assert os.listdir(tmp_path) == []
    assert files.version == 0 and not files.pending


def test_restore_puts_back_the_round_start(tmp_path: Path) -> None:
    files = BestModelFiles(tmp_path)
    files.write(model(1.0), {"round": 1}, {"round": 1})
    files.commit()  # round 1 completed
    before = {p: (tmp_path / p).read_bytes() for p in (MODEL_FILE, RECORD_FILE)}
    inode = os.stat(tmp_path / MODEL_FILE).st_ino
    files.write(model(2.0), {"round": 2}, {"round": 2})
    files.write(model(3.0), {"round": 3}, {"round": 3})  # two writes in one round
    assert files.pending and files.version == 3
    # the round-start model is the old file under a second name, not a copy
    kept = round_start_path(tmp_path / MODEL_FILE)
    assert os.stat(kept).st_ino == inode and kept.read_bytes() == before[MODEL_FILE]
    assert files.restore() == 1
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == [RECORD_FILE, MODEL_FILE]
    assert not files.pending and files.version == 1
    assert files.restore() is None  # nothing left to undo


def test_restore_of_a_first_best_removes_the_files(tmp_path: Path) -> None:
    files = BestModelFiles(tmp_path)
    files.write(model(1.0), {}, {"round": 0})
    assert files.restore() == 0
    assert not (tmp_path / MODEL_FILE).exists() and not (tmp_path / RECORD_FILE).exists()


def test_commit_keeps_what_was_written(tmp_path: Path) -> None:
    files = BestModelFiles(tmp_path)
    files.write(model(1.0), {}, {"round": 0})
    files.write(model(2.0), {}, {"round": 1})
    files.commit()
    assert files.restore() is None
    assert json.loads((tmp_path / RECORD_FILE).read_text())["round"] == 1
    assert sorted(os.listdir(tmp_path)) == [RECORD_FILE, MODEL_FILE]  # round-start copies gone


def test_without_a_run_directory_only_the_version_moves() -> None:
    files = BestModelFiles(None)
    assert files.model_path is None and files.record_path is None
    assert files.write(model(1.0), {}, {}) == 1
    assert files.restore() == 0


def test_a_crash_while_writing_leaves_the_previous_best(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = BestModelFiles(tmp_path)
    files.write(model(1.0), {"round": 1}, {"round": 1})
    files.commit()
    before = {p: (tmp_path / p).read_bytes() for p in (MODEL_FILE, RECORD_FILE)}

    def power_cut(fd: int) -> None:
        raise OSError("power cut")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", power_cut)
        with pytest.raises(OSError, match="power cut"):
            files.write(model(2.0), {"round": 2}, {"round": 2})
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
    assert files.restore() == 1  # what the handler does when the round fails
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == [RECORD_FILE, MODEL_FILE]  # no half-written file


def test_a_crash_between_the_two_files_is_detectable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = BestModelFiles(tmp_path)
    files.write(model(1.0), {"round": 1}, {"round": 1})
    files.commit()
    real = flcore.write_atomic

    def record_lost(path: Path, data: bytes) -> None:
        if path.name == RECORD_FILE:
            raise OSError("power cut")
        real(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(flcore, "write_atomic", record_lost)
        with pytest.raises(OSError):
            files.write(model(2.0), {"round": 2}, {"round": 2})
    record = json.loads((tmp_path / RECORD_FILE).read_text())
    payload = (tmp_path / MODEL_FILE).read_bytes()
    assert record["round"] == 1 and record["sha256"] != hashlib.sha256(payload).hexdigest()
    assert files.restore() == 1  # and the round's undo puts the described model back
    payload = (tmp_path / MODEL_FILE).read_bytes()
    assert record["sha256"] == hashlib.sha256(payload).hexdigest()
