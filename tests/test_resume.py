"""Resume: a run stopped after a committed round continues to the same final weights."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flcore import hookimpl, training
from flcore.durable import StorageError
from flcore.errors import FLCoreError
from flcore.run import resume_job, run_job
from flcore.training import ResumeRefused, RunFailed
from tests.conftest import ROOT, small_job, three_rounds


class Counter:
    """Keeps a count across rounds outside ``ctx``: only ``save_state``/``resume`` carry it
    over a restart. ``crash_in`` makes ``end_round`` of that round raise (a crash)."""

    def __init__(self, crash_in: int | None = None) -> None:
        self.crash_in = crash_in
        self.rounds_seen = 0
        self.resumed_with: Any = None

    @hookimpl
    def end_round(self, ctx: Any) -> None:
        if ctx.round == self.crash_in:
            raise RuntimeError("the server died")
        self.rounds_seen += 1
        ctx.metrics["rounds_seen"] = self.rounds_seen

    @hookimpl
    def save_state(self, ctx: Any) -> dict[str, int]:
        return {"rounds_seen": self.rounds_seen}

    @hookimpl
    def resume(self, ctx: Any, state: Any) -> None:
        self.resumed_with = dict(state)
        self.rounds_seen = state["counter"]["rounds_seen"]


def four_rounds() -> Any:
    return small_job(["counter"], job={"rounds": 4})


def test_a_resumed_run_ends_with_the_uninterrupted_runs_bytes(tmp_path: Path) -> None:
    whole = run_job(four_rounds(), out=tmp_path / "whole", extra_plugins={"counter": Counter()})
    with pytest.raises(RunFailed, match="last completed round \\(2\\)"):
        run_job(four_rounds(), out=tmp_path / "cut", extra_plugins={"counter": Counter(3)})
    resumed = Counter()
    result = run_job(
        four_rounds(), out=tmp_path / "cut", extra_plugins={"counter": resumed}, resume=True
    )
    assert resumed.resumed_with == {"counter": {"rounds_seen": 2}}
    assert result.global_model_path.read_bytes() == whole.global_model_path.read_bytes()
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1, 2, 3, 4]
    assert [m["rounds_seen"] for m in lines] == [1, 2, 3, 4]
    assert [m["round"] for m in result.history] == [1, 2, 3, 4]


def test_hook_save_state(tmp_path: Path) -> None:
    from flcore import codec

    result = run_job(four_rounds(), out=tmp_path / "run", extra_plugins={"counter": Counter()})
    _, meta = codec.load_file(result.global_model_path)
    assert meta["round"] == 4 and meta["state"] == {"counter": {"rounds_seen": 4}}

    class NotJson:
        @hookimpl
        def save_state(self, ctx: Any) -> Any:
            return {"x": object()}

    with pytest.raises(
        RunFailed,
        match=r"Round 1 failed: plugin 'bad': save_state returned state\['x'\]: an object is "
        r"neither JSON nor a tensor.*No round had completed",
    ):
        run_job(small_job(["bad"]), out=tmp_path / "bad", extra_plugins={"bad": NotJson()})


def test_hook_resume(tmp_path: Path) -> None:
    with pytest.raises(RunFailed):
        run_job(four_rounds(), out=tmp_path / "run", extra_plugins={"counter": Counter(2)})
    counter = Counter()
    run_job(four_rounds(), out=tmp_path / "run", extra_plugins={"counter": counter}, resume=True)
    assert counter.resumed_with == {"counter": {"rounds_seen": 1}}
    assert counter.rounds_seen == 4
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "run_resumed" and e["round"] == 1 for e in events)
    assert not any(e["event"] == "resume_without_plugin_state" for e in events)


def test_a_resume_names_the_plugins_that_keep_no_state(tmp_path: Path) -> None:
    class Forgetful:
        @hookimpl
        def end_round(self, ctx: Any) -> None:
            if ctx.round == 2 and not getattr(self, "resumed", False):
                raise RuntimeError("the server died")

    job = small_job(["forgetful"], job={"rounds": 3})
    with pytest.raises(RunFailed):
        run_job(job, out=tmp_path / "run", extra_plugins={"forgetful": Forgetful()})
    again = Forgetful()
    again.resumed = True  # type: ignore[attr-defined]
    run_job(job, out=tmp_path / "run", extra_plugins={"forgetful": again}, resume=True)
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    (warning,) = [e for e in events if e["event"] == "resume_without_plugin_state"]
    assert warning["plugins"] == ["forgetful"]


def test_a_fresh_run_never_fires_resume(tmp_path: Path) -> None:
    counter = Counter()
    run_job(four_rounds(), out=tmp_path / "run", extra_plugins={"counter": counter})
    assert counter.resumed_with is None


def test_resume_refuses_what_it_cannot_continue(tmp_path: Path) -> None:
    done = run_job(small_job(), out=tmp_path / "done")
    with pytest.raises(FLCoreError, match="all 2 rounds are done"):
        run_job(small_job(), out=done.run_dir, resume=True)
    with pytest.raises(FLCoreError, match=r"no job\.toml"):
        run_job(small_job(), out=tmp_path / "nothing", resume=True)
    with pytest.raises(FLCoreError, match=r"differs from its job\.toml"):
        run_job(small_job(job={"seed": 1}), out=done.run_dir, resume=True)
    (done.run_dir / "global_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(FLCoreError, match="cannot resume"):
        run_job(small_job(job={"rounds": 2}), out=done.run_dir, resume=True)


def flcore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flcore", *args], cwd=ROOT, capture_output=True, text=True
    )


def test_flcore_run_resume_on_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a run of the core's defaults only, stopped by a full disk after round 1
    whole = run_job(small_job(job={"rounds": 3}), out=tmp_path / "whole")
    cut = cut_after(1, tmp_path / "cut", monkeypatch)
    done = flcore("run", "--resume", str(cut))
    assert done.returncode == 0, done.stderr
    assert (cut / "global_model.safetensors").read_bytes() == whole.global_model_path.read_bytes()
    again = flcore("run", "--resume", str(cut))
    assert again.returncode == 1 and "all 3 rounds are done" in again.stderr
    assert "give a JOB_FILE" in flcore("run").stderr
    assert "drop --out" in flcore("run", "--resume", "x", "--out", "y").stderr
    assert "--set needs the JOB_FILE" in flcore("run", "--resume", "x", "--set", "a.b=1").stderr


# -- what a crash or a full disk leaves, and what a resume refuses ----------------------


def cut_after(
    round_: int, run: Path, monkeypatch: pytest.MonkeyPatch, resume: bool = False
) -> Path:
    """``run`` of :func:`three_rounds`, stopped by a full disk at the metrics line of the
    round after ``round_`` (or finished when that is past the last)."""
    real = training.append_to

    def append_to(path: Path, line: bytes) -> None:
        if json.loads(line)["round"] == round_ + 1:
            raise StorageError(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        real(path, line)

    with monkeypatch.context() as patch:
        patch.setattr(training, "append_to", append_to)
        with pytest.raises(RunFailed, match=f"round {round_} complete"):
            run_job(three_rounds(), out=run, resume=resume)
    return run


def events(run: Path, name: str) -> list[dict[str, Any]]:
    lines = (run / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == name]


def resume(run: Path) -> Any:
    return run_job(resume_job(run), out=run, resume=True)


def test_a_torn_last_metrics_line_is_dropped(
    whole: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = cut_after(1, tmp_path / "run", monkeypatch)
    with open(run / "metrics.jsonl", "ab") as fh:
        fh.write(b'{"round": 2, "test": {"loss": 2.29')  # the line a crash cut short
    result = resume(run)
    assert result.global_model_path.read_bytes() == whole
    assert [m["round"] for m in result.history] == [1, 2, 3]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]
    (dropped,) = events(run, "metrics_line_dropped")
    assert dropped["line"] == 2 and dropped["reason"] == "torn"


def test_a_bad_metrics_line_before_the_last_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = cut_after(2, tmp_path / "run", monkeypatch)
    lines = (run / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (run / "metrics.jsonl").write_bytes(b"[" * 100_000 + b"\n" + lines[1])
    with pytest.raises(ResumeRefused, match=r"metrics\.jsonl line 1 is not a JSON object"):
        resume(run)


def orphan(path: Path) -> None:
    """What a process killed while :func:`flcore.codec.write_atomic` wrote ``path`` leaves."""
    code = (
        "import os, sys; from pathlib import Path; from flcore import codec; "
        "codec._write_atomic(Path(sys.argv[1]), lambda fh: (fh.write(b'x' * 4096), os._exit(0)))"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, cwd=ROOT)


def test_temporary_files_that_killed_writes_left_are_removed(
    whole: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = cut_after(1, tmp_path / "run", monkeypatch)
    orphan(run / "global_model.safetensors")
    orphan(run / "rounds" / "0002" / "global_model.safetensors")
    (run / "notes.tmp").write_text("not ours")
    temps = sorted(str(p.relative_to(run)) for p in run.rglob(".*.tmp"))
    assert len(temps) == 2
    result = resume(run)
    assert result.global_model_path.read_bytes() == whole
    assert not list(run.rglob(".*.tmp")) and (run / "notes.tmp").exists()
    (removed,) = events(run, "temp_files_removed")
    assert removed["files"] == temps


def test_a_flipped_bit_in_the_model_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = cut_after(1, tmp_path / "run", monkeypatch)
    model = bytearray((run / "global_model.safetensors").read_bytes())
    model[-3] ^= 0x10  # a weight's bit: the file still decodes
    (run / "global_model.safetensors").write_bytes(model)
    with pytest.raises(
        ResumeRefused,
        match=r"global_model\.safetensors \(round 1, sha256 \w+\.\.\.\) is not the model "
        r"checkpoint\.json records",
    ):
        resume(run)
    result = flcore("run", "--resume", str(run))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        result.stderr.count("\n") == 1
        and "is not the model checkpoint.json records" in result.stderr
    )


def test_an_edited_job_toml_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = cut_after(1, tmp_path / "run", monkeypatch)
    job_toml = run / "job.toml"
    job_toml.write_text(job_toml.read_text().replace("lr = 0.1", "lr = 0.2"))
    with pytest.raises(ResumeRefused, match=r"its job\.toml differs from the job the run was"):
        resume(run)
    given = tmp_path / "job.toml"  # the same edit given on the command line as well
    given.write_text(job_toml.read_text())
    result = flcore("run", str(given), "--resume", str(run))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "its job.toml differs" in result.stderr


def test_a_checkpoint_behind_the_model_is_accepted_and_logged(
    whole: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = cut_after(1, tmp_path / "run", monkeypatch)
    round_1 = (run / "checkpoint.json").read_bytes()
    cut_after(2, run, monkeypatch, resume=True)
    (run / "checkpoint.json").write_bytes(round_1)  # the model of round 2 is newer
    assert resume(run).global_model_path.read_bytes() == whole
    (behind,) = events(run, "checkpoint_behind")
    assert behind["round"] == 2 and behind["checkpoint_round"] == 1


def test_a_checkpoint_without_digests_is_accepted_and_logged(
    whole: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = cut_after(1, tmp_path / "run", monkeypatch)
    old = json.loads((run / "checkpoint.json").read_text())
    for key in ("sha256", "previous", "job_sha256"):  # as an older flcore wrote it
        del old[key]
    (run / "checkpoint.json").write_text(json.dumps(old))
    assert resume(run).global_model_path.read_bytes() == whole
    assert events(run, "checkpoint_unverified")


def test_a_missing_or_broken_checkpoint_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = cut_after(1, tmp_path / "run", monkeypatch)
    (run / "checkpoint.json").write_text("{")
    with pytest.raises(ResumeRefused, match=r"checkpoint\.json is not a JSON object"):
        resume(run)
    (run / "checkpoint.json").unlink()
    with pytest.raises(ResumeRefused, match=r"it has no checkpoint\.json"):
        resume(run)
