"""The round loop's contract: one trainer per run, round-scoped rollback, retries counted
per round, ``shutdown`` after a failed ``startup``, the cohort, and one trainer class."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flcore import hookimpl
from flcore.errors import JobError
from flcore.run import run_job
from flcore.trainer import ModelTrainer
from flcore.training import RunFailed
from tests.conftest import flcore_in, small_job


def events(run_dir: Path, name: str) -> list[dict[str, Any]]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == name]


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


class Journal:
    """Records ``(plugin, hook)`` for the hooks below, and raises in ``fail_in``."""

    def __init__(self, name: str, calls: list[tuple[str, str]], fail_in: str | None = None):
        self.name, self.calls, self.fail_in = name, calls, fail_in

    def _note(self, hook: str) -> None:
        self.calls.append((self.name, hook))
        if hook == self.fail_in:
            raise RuntimeError(f"{self.name} fails in {hook}")

    @hookimpl
    def start_round(self, ctx: Any) -> None:
        self._note("start_round")

    @hookimpl
    def after_aggregation(self, ctx: Any) -> None:
        self._note("after_aggregation")

    @hookimpl
    def end_round(self, ctx: Any) -> None:
        self._note("end_round")

    @hookimpl
    def rollback(self, ctx: Any) -> None:
        self.calls.append((self.name, "rollback"))


def test_rollback_reaches_every_plugin_of_the_round_once_the_raiser_included(
    tmp_path: Path,
) -> None:
    calls: list[tuple[str, str]] = []

    class Late:  # handles only an event after the failure: never touched the round
        @hookimpl
        def end_round(self, ctx: Any) -> None:
            calls.append(("late", "end_round"))

        @hookimpl
        def rollback(self, ctx: Any) -> None:
            calls.append(("late", "rollback"))

    plugins = {
        "a": Journal("a", calls),
        "b": Journal("b", calls, fail_in="after_aggregation"),
        "c": Journal("c", calls),
        "late": Late(),
    }
    with pytest.raises(RunFailed, match="plugin 'b' raised in 'after_aggregation'"):
        run_job(small_job(["a", "b", "c", "late"]), out=tmp_path / "run", extra_plugins=plugins)
    rollbacks = [name for name, hook in calls if hook == "rollback"]
    # a, b and c handled start_round (in that order): each rolls back once, last first;
    # c never reached after_aggregation but handled the round, so it is rolled back too
    assert rollbacks == ["c", "b", "a"]


def test_retry_with_max_retries_2_makes_exactly_3_attempts_then_exits_1(
    plugin_env_python: Path, tmp_path: Path
) -> None:
    job = tmp_path / "job.toml"
    job.write_text(
        '[job]\nname = "retry"\ntask = "examples.digits"\nrounds = 2\nclients = 2\n'
        'on_error = "retry"\nmax_retries = 2\n[task]\nhidden = 8\n'
        '[plugins]\nchain = ["failing"]\n[plugins.failing]\nround = 1\n'
    )
    out = tmp_path / "run"
    done = flcore_in(plugin_env_python, "run", str(job), "--out", str(out))
    assert done.returncode == 1, done.stderr
    assert "tried 3 time(s) in all ([job] max_retries = 2)" in done.stderr
    assert "Traceback" not in done.stderr
    failed = events(out, "round_failed")
    assert [(e["round"], e["attempt"]) for e in failed] == [(1, 1), (1, 2), (1, 3)]
    assert [e["attempt"] for e in events(out, "round_retry")] == [2, 3]
    assert not (out / "metrics.jsonl").exists()  # no round was ever committed


def test_retries_count_per_round_and_a_committed_round_starts_afresh(tmp_path: Path) -> None:
    failures = {1: 1, 2: 1}  # round -> failures left: each round fails once, then passes

    class FlakyPerRound:
        @hookimpl
        def end_round(self, ctx: Any) -> None:
            if failures.get(ctx.round, 0):
                failures[ctx.round] -= 1
                raise RuntimeError("flaky")

    job = small_job(["flaky"], job={"rounds": 2, "on_error": "retry", "max_retries": 1})
    result = run_job(job, out=tmp_path / "run", extra_plugins={"flaky": FlakyPerRound()})
    assert [m["round"] for m in result.history] == [1, 2]
    assert [(e["round"], e["attempt"]) for e in events(result.run_dir, "round_failed")] == [
        (1, 1),
        (2, 1),
    ]


def test_shutdown_runs_after_a_failed_startup(tmp_path: Path) -> None:
    calls: list[str] = []

    class BadStart:
        @hookimpl
        def startup(self, ctx: Any) -> None:
            calls.append("startup")
            raise RuntimeError("cannot open the database")

        @hookimpl
        def shutdown(self, ctx: Any) -> None:
            calls.append("shutdown")

    with pytest.raises(Exception, match="cannot open the database"):
        run_job(small_job(["bad"]), out=tmp_path / "run", extra_plugins={"bad": BadStart()})
    assert calls == ["startup", "shutdown"]


def test_one_trainer_runs_the_whole_training(tmp_path: Path) -> None:
    made: list[int] = []

    class Once(ModelTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            made.append(1)
            super().__init__(*args, **kwargs)

    class Picks:
        @hookimpl
        def get_trainer_class(self, ctx: Any) -> type:
            return Once

    run_job(small_job(["picks"], job={"rounds": 3}), tmp_path / "run", {"picks": Picks()})
    assert made == [1]


def test_two_plugins_answering_get_trainer_class_is_an_error_naming_both(tmp_path: Path) -> None:
    class One:
        @hookimpl
        def get_trainer_class(self, ctx: Any) -> type:
            return ModelTrainer

    with pytest.raises(JobError, match="plugins 'one' and 'two' both answer get_trainer_class"):
        run_job(small_job(["one", "two"]), tmp_path / "run", {"one": One(), "two": One()})


def test_clients_per_round_samples_a_reproducible_cohort_listed_in_metrics(
    tmp_path: Path,
) -> None:
    job = small_job(job={"clients": 10, "clients_per_round": 3, "rounds": 4})
    first = run_job(job, out=tmp_path / "a")
    again = run_job(job, out=tmp_path / "b")
    cohorts = [m["cohort"] for m in metrics(first.run_dir)]
    assert all(len(c) == 3 and len(set(c)) == 3 for c in cohorts)
    assert len({tuple(c) for c in cohorts}) > 1  # rounds draw different cohorts
    assert cohorts == [m["cohort"] for m in metrics(again.run_dir)]
    assert [m["clients"] for m in metrics(first.run_dir)] == cohorts
    assert first.global_model_path.read_bytes() == again.global_model_path.read_bytes()


def test_a_cohort_gives_the_same_bytes_in_a_worker_pool(tmp_path: Path) -> None:
    job = small_job(job={"clients": 10, "clients_per_round": 3, "rounds": 3})
    embedded = run_job(job, out=tmp_path / "embedded")
    pooled = small_job(job={"clients": 10, "clients_per_round": 3, "rounds": 3, "workers": 2})
    pool = run_job(pooled, out=tmp_path / "pool")
    assert [m["cohort"] for m in metrics(pool.run_dir)] == [
        m["cohort"] for m in metrics(embedded.run_dir)
    ]
    assert pool.global_model_path.read_bytes() == embedded.global_model_path.read_bytes()


def test_min_clients_counts_within_the_cohort(tmp_path: Path) -> None:
    with pytest.raises(JobError, match=r"min_clients \(4\) is above clients_per_round \(3\)"):
        small_job(job={"clients": 10, "clients_per_round": 3, "min_clients": 4})
    with pytest.raises(JobError, match=r"clients_per_round \(11\) is above clients \(10\)"):
        small_job(job={"clients": 10, "clients_per_round": 11})


def test_a_selection_that_names_a_stranger_fails_the_round(tmp_path: Path) -> None:
    class Stranger:
        @hookimpl
        def select_clients(self, ctx: Any, clients: Any) -> list[str]:
            return ["client-0", "mallory"]

    with pytest.raises(RunFailed, match=r"select_clients must answer .*unknown: \['mallory'\]"):
        run_job(small_job(["s"]), tmp_path / "run", {"s": Stranger()})


def test_hook_select_clients(tmp_path: Path) -> None:
    class EvenRounds:
        @hookimpl
        def select_clients(self, ctx: Any, clients: Any) -> list[str]:
            return list(clients)[ctx.round % 2 :: 2]

    result = run_job(
        small_job(["even"], job={"clients": 4}), tmp_path / "run", {"even": EvenRounds()}
    )
    assert [m["cohort"] for m in result.history] == [
        ["client-1", "client-3"],
        ["client-0", "client-2"],
    ]
