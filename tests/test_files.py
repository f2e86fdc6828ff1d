"""The run directory under a full disk: every write fails cleanly, with one line naming the
file, and leaves a run that ``--resume`` finishes with the uninterrupted run's bytes."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flcore import hookimpl, write_atomic
from flcore.errors import FLCoreError
from flcore.run import run_job
from tests.conftest import ROOT, small_job, three_rounds

ENOSPC = os.strerror(errno.ENOSPC)


def _path_of(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


class FullDisk:
    """From the first write ``fills`` picks on, writes into ``folder`` fail with ENOSPC, as
    on a disk that filled there: ``os.write`` (the log lines) and ``os.fsync`` (the atomic
    files: their data is written, the sync fails). Once only when not ``stays_full``."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        folder: Path,
        fills: Callable[[str, bytes | None], bool],
        stays_full: bool = True,
    ) -> None:
        self.folder, self.fills, self.stays_full = str(folder), fills, stays_full
        self.full = False
        self.failed: list[str] = []
        real_write, real_fsync = os.write, os.fsync

        def write(fd: int, data: Any) -> int:
            self._check(fd, bytes(data))
            return real_write(fd, data)

        def fsync(fd: Any) -> None:
            self._check(fd if isinstance(fd, int) else fd.fileno(), None)
            real_fsync(fd)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "fsync", fsync)

    def _check(self, fd: int, data: bytes | None) -> None:
        path = _path_of(fd)
        if not path.startswith(self.folder + os.sep):
            return
        fills = self.fills(os.path.basename(path), data)
        if fills or (self.full and self.stays_full):
            self.full = True
            self.failed.append(os.path.basename(path))
            raise OSError(errno.ENOSPC, ENOSPC)

    def free(self) -> None:
        self.fills = lambda name, data: False
        self.full = False


def line_of_round(file: str, round_: int) -> Callable[[str, bytes | None], bool]:
    """The disk fills writing the first line of ``file`` that is about ``round_``."""
    return lambda name, data: (
        name == file
        and data is not None
        and f'"round": {round_}' in (data.decode(errors="replace"))
    )


def nth_sync_of(file: str, n: int) -> Callable[[str, bytes | None], bool]:
    """The disk fills syncing the ``n``-th temporary file of ``file`` (1: round 0's)."""
    temp = re.compile(rf"\.{re.escape(file)}\.[a-z0-9_]{{8}}\.tmp")
    seen = [0]

    def fills(name: str, data: bytes | None) -> bool:
        if data is None and temp.fullmatch(name):
            seen[0] += 1
            return seen[0] == n
        return False

    return fills


# round 2 fails to write (its model and checkpoint are the 3rd of their files): the run
# stops with round 1 complete, whichever file it was
FAULTS = {
    "events line": (line_of_round("events.jsonl", 2), "events.jsonl"),
    "metrics line": (line_of_round("metrics.jsonl", 2), "metrics.jsonl"),
    "model file": (nth_sync_of("global_model.safetensors", 3), "global_model.safetensors"),
    "checkpoint": (nth_sync_of("checkpoint.json", 3), "checkpoint.json"),
}


def events(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def assert_whole_lines(run: Path) -> None:
    """No torn line, no temporary file: what a failed write must never leave."""
    for name in ("events.jsonl", "metrics.jsonl"):
        if (run / name).exists():
            text = (run / name).read_text()
            assert not text or text.endswith("\n")
            for line in text.splitlines():
                json.loads(line)
    assert not [p.name for p in run.rglob("*.tmp")]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_full_disk_stops_the_run_with_one_line_and_a_resume_finishes_it(
    fault: str, whole: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fills, file = FAULTS[fault]
    run = tmp_path / "run"
    disk = FullDisk(monkeypatch, tmp_path, fills)
    with pytest.raises(FLCoreError) as failed:
        run_job(three_rounds(), out=run)
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith(f"cannot write {run / file}: {ENOSPC}. ")
    assert f"round 1 complete in {run}" in message and f"--resume {run}" in message
    assert_whole_lines(run)
    disk.free()
    result = run_job(three_rounds(), out=run, resume=True)
    assert result.global_model_path.read_bytes() == whole
    assert [m["round"] for m in result.history] == [1, 2, 3]
    resumed = [e for e in events(run) if e["event"] == "run_resumed"]
    assert [e["round"] for e in resumed] == [1]
    # the model of round 2 failed after its checkpoint was written: resume finds the
    # checkpoint a round ahead, and its "previous" vouches for round 1's model
    ahead = [e for e in events(run) if e["event"] == "checkpoint_ahead"]
    assert bool(ahead) == (fault == "model file")


def test_a_full_disk_found_only_at_the_end_of_the_run_stops_it_too(
    whole: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"  # the last round's model is written after its round ended
    disk = FullDisk(monkeypatch, tmp_path, nth_sync_of("global_model.safetensors", 4))
    with pytest.raises(FLCoreError) as failed:
        run_job(three_rounds(), out=run)
    assert str(failed.value).startswith(f"cannot write {run / 'global_model.safetensors'}: ")
    assert "round 2 complete" in str(failed.value)
    disk.free()
    assert run_job(three_rounds(), out=run, resume=True).global_model_path.read_bytes() == whole


def test_a_failed_run_leaves_a_summary_with_the_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    FullDisk(monkeypatch, tmp_path, line_of_round("metrics.jsonl", 3), stays_full=False)
    with pytest.raises(FLCoreError, match=r"metrics\.jsonl"):
        run_job(three_rounds(), out=run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final"]["round"] == 2
    assert summary["failed"].startswith(f"cannot write {run / 'metrics.jsonl'}: {ENOSPC}")


def test_a_full_disk_at_round_0_resumes_from_the_start(
    whole: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    disk = FullDisk(monkeypatch, tmp_path, nth_sync_of("global_model.safetensors", 1))
    with pytest.raises(FLCoreError, match=f"cannot write {run / 'global_model.safetensors'}"):
        run_job(three_rounds(), out=run)
    assert not (run / "global_model.safetensors").exists()
    disk.free()
    result = run_job(three_rounds(), out=run, resume=True)
    assert result.global_model_path.read_bytes() == whole
    assert any(e["event"] == "resume_from_start" for e in events(run))


# The CLI in a process of its own, with the disk filling at round 2's metrics line.
FILL_AT_ROUND_2 = """
import errno, os, sys
real_write = os.write
def write(fd, data):
    path = os.readlink(f"/proc/self/fd/{fd}")
    if path.endswith("metrics.jsonl") and b'"round": 2' in bytes(data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_write(fd, data)
os.write = write
from flcore.cli import main
main(sys.argv[1:], prog_name="flcore")
"""


def flcore(*args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    head = ["-c", code] if code else ["-m", "flcore"]
    return subprocess.run([sys.executable, *head, *args], cwd=ROOT, capture_output=True, text=True)


def assert_one_line_error(stderr: str, path: Path) -> None:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert errors[0].startswith(f"error: cannot write {path}: {ENOSPC}"), stderr


def test_flcore_run_stops_on_a_full_disk_with_one_line(whole: bytes, tmp_path: Path) -> None:
    job_file = tmp_path / "job.toml"
    job_file.write_text(three_rounds().to_toml())
    run = tmp_path / "run"
    failed = flcore("run", str(job_file), "--out", str(run), code=FILL_AT_ROUND_2)
    assert failed.returncode == 1
    assert_one_line_error(failed.stderr, run / "metrics.jsonl")
    assert "--resume" in failed.stderr
    done = flcore("run", "--resume", str(run))
    assert done.returncode == 0, done.stderr
    assert (run / "global_model.safetensors").read_bytes() == whole


# -- a real full filesystem: a tmpfs of a few pages ------------------------------------


class SmallDisk:
    """A tmpfs mounted at ``path``, resizable (root only)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def resize(self, kib: int) -> None:
        subprocess.run(
            ["mount", "-o", f"remount,size={kib}k", str(self.path)], check=True, capture_output=True
        )


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    path = tmp_path / "disk"
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


#: Sizes of the disk (KiB, whole pages) from too small for round 0's files to enough for
#: the run: each fills at another write (checkpoint, model, events, metrics line).
FILL_LEVELS = range(4, 36, 4)


def test_every_fill_level_of_a_real_disk_stops_cleanly_and_resumes(
    small_disk: SmallDisk, whole: bytes
) -> None:
    run = small_disk.path / "run"
    outcomes = []
    for kib in FILL_LEVELS:
        shutil.rmtree(run, ignore_errors=True)
        small_disk.resize(kib)
        try:
            run_job(three_rounds(), out=run)
            outcomes.append("finished")
        except FLCoreError as err:
            message = str(err)
            assert "\n" not in message
            assert re.match(rf"cannot write {re.escape(str(run))}/[\w.]+: {ENOSPC}", message)
            assert_whole_lines(run)
            outcomes.append(message.split(":")[0].rsplit("/", 1)[1])
            small_disk.resize(1024)
            run_job(three_rounds(), out=run, resume=True)
        assert (run / "global_model.safetensors").read_bytes() == whole, kib
        assert json.loads((run / "summary.json").read_text())["rounds"] == 3
    assert outcomes[-1] == "finished"
    assert len(set(outcomes)) >= 4, outcomes  # the disk filled at several different files


def test_flcore_run_on_a_real_full_disk(small_disk: SmallDisk, whole: bytes) -> None:
    job_file = small_disk.path.parent / "job.toml"
    job_file.write_text(three_rounds().to_toml())
    run = small_disk.path / "run"
    small_disk.resize(20)
    failed = flcore("run", str(job_file), "--out", str(run))
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr
    (error,) = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert re.match(rf"error: cannot write {re.escape(str(run))}/[\w.]+: {ENOSPC}", error)
    small_disk.resize(1024)
    done = flcore("run", "--resume", str(run))
    assert done.returncode == 0, done.stderr
    assert (run / "global_model.safetensors").read_bytes() == whole


class WritesInRound2:
    """A plugin that writes a file of its own into the run directory in round 2."""

    @hookimpl
    def end_round(self, ctx: Any) -> None:
        if ctx.round == 2:
            write_atomic(ctx.run_dir / "best.bin", b"x" * 100)


def test_a_plugins_write_on_a_full_disk_stops_the_run_without_retries(
    whole: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    job = small_job(["writer"], job={"rounds": 3, "on_error": "retry", "max_retries": 3})
    disk = FullDisk(monkeypatch, tmp_path, nth_sync_of("best.bin", 1))
    with pytest.raises(FLCoreError) as failed:
        run_job(job, out=run, extra_plugins={"writer": WritesInRound2()})
    assert str(failed.value).startswith(f"cannot write {run / 'best.bin'}: {ENOSPC}. ")
    assert "round 1 complete" in str(failed.value)
    disk.free()
    assert not [e for e in events(run) if e["event"] == "round_retry"]
    result = run_job(job, out=run, extra_plugins={"writer": WritesInRound2()}, resume=True)
    assert result.global_model_path.read_bytes() == whole
    assert (run / "best.bin").exists()
