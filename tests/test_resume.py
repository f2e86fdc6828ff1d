"""Resume: a run stopped after a committed round continues to the same final weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flcore import hookimpl
from flcore.errors import FLCoreError
from flcore.run import run_job
from flcore.training import RunFailed
from tests.conftest import ROOT, small_job


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


def test_flcore_run_resume_on_the_command_line(tmp_path: Path) -> None:
    # a run of the core's defaults only, cut after round 1: a 1-round run's files under
    # the 3-round job (round 1 of both is the same round)
    whole = run_job(small_job(job={"rounds": 3}), out=tmp_path / "whole")
    cut = run_job(small_job(job={"rounds": 1}), out=tmp_path / "cut1")
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "job.toml").write_text(small_job(job={"rounds": 3}).to_toml())
    for name in ("global_model.safetensors", "metrics.jsonl"):
        (tmp_path / "cut" / name).write_bytes((cut.run_dir / name).read_bytes())
    done = flcore("run", "--resume", str(tmp_path / "cut"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cut" / "global_model.safetensors").read_bytes() == (
        whole.global_model_path.read_bytes()
    )
    again = flcore("run", "--resume", str(tmp_path / "cut"))
    assert again.returncode == 1 and "all 3 rounds are done" in again.stderr
    assert "give a JOB_FILE" in flcore("run").stderr
    assert "drop --out" in flcore("run", "--resume", "x", "--out", "y").stderr
    assert "--set needs the JOB_FILE" in flcore("run", "--resume", "x", "--set", "a.b=1").stderr
