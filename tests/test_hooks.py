"""One test per hook (the meta-test in test_hookspecs.py checks that each has one).

A spy plugin implementing every hook runs in one real job; each test reads what its hook saw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from flcore import codec, hookimpl
from flcore.errors import JobError
from flcore.run import RunResult, run_job
from flcore.trainer import ModelTrainer, TrainingRoundFinished
from tests.conftest import small_job


class PingTrainer(ModelTrainer):
    """Sends one extra request (``ping``) before training, answered by the spy's client_request."""

    def start(self) -> None:
        for result in self.ctx.send_to_clients("ping", b"hello", self.ctx.clients):
            self.ctx.state.setdefault("pongs", []).append((result.client_id, result.payload))
        super().start()


class Spy:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int, Any]] = []

    def seen(self, hook: str) -> list[tuple[str, str, int, Any]]:
        return [c for c in self.calls if c[0] == hook]

    def _rec(self, hook: str, ctx: Any, detail: Any = None) -> None:
        self.calls.append((hook, ctx.side, ctx.round, detail))

    @hookimpl
    def check_job(self, ctx: Any) -> None:
        self._rec("check_job", ctx, ctx.task.path)

    @hookimpl
    def startup(self, ctx: Any) -> None:
        self._rec("startup", ctx)

    @hookimpl
    def client_register(self, ctx: Any, client_id: str) -> None:
        self._rec("client_register", ctx, client_id)

    @hookimpl
    def client_quit(self, ctx: Any, client_id: str) -> None:
        self._rec("client_quit", ctx, client_id)

    @hookimpl
    def shutdown(self, ctx: Any) -> None:
        self._rec("shutdown", ctx)

    @hookimpl
    def start_round(self, ctx: Any) -> None:
        self._rec("start_round", ctx, len(ctx.contributions))

    @hookimpl
    def send_global_model(self, ctx: Any, weights: Any) -> None:
        self._rec("send_global_model", ctx, {k: v.clone() for k, v in weights.items()})

    @hookimpl
    def receive_contribution(self, ctx: Any, contribution: Any) -> None:
        self._rec("receive_contribution", ctx, (contribution.client_id, contribution.num_samples))

    @hookimpl
    def before_aggregation(self, ctx: Any) -> None:
        self._rec("before_aggregation", ctx, sorted(c.client_id for c in ctx.contributions))

    @hookimpl
    def after_aggregation(self, ctx: Any) -> None:
        self._rec("after_aggregation", ctx, {k: v.clone() for k, v in ctx.global_model.items()})

    @hookimpl
    def test_round(self, ctx: Any) -> None:
        self._rec("test_round", ctx, "test" in ctx.metrics)

    @hookimpl
    def end_round(self, ctx: Any) -> None:
        ctx.metrics["spy"] = ctx.round * 10
        self._rec("end_round", ctx, dict(ctx.metrics))

    @hookimpl
    def finish(self, ctx: Any) -> None:
        self._rec("finish", ctx, ctx.is_last_round)

    @hookimpl
    def rollback(self, ctx: Any) -> None:
        self._rec("rollback", ctx)

    @hookimpl
    def receive_model(self, ctx: Any, weights: Any) -> None:
        loaded = ctx.model.state_dict()
        same = all(torch.equal(weights[k], loaded[k]) for k in loaded)
        self._rec("receive_model", ctx, (ctx.client_id, same))

    @hookimpl
    def receive_validation_models(self, ctx: Any, models: dict) -> None:
        models["zeros"] = {k: torch.zeros_like(v) for k, v in models["global"].items()}
        self._rec("receive_validation_models", ctx, (ctx.client_id, sorted(models)))

    @hookimpl
    def send_validation_results(self, ctx: Any, results: dict) -> None:
        self._rec("send_validation_results", ctx, (ctx.client_id, sorted(results)))

    @hookimpl
    def send_best_model(self, ctx: Any, weights: Any) -> None:
        self._rec("send_best_model", ctx, (ctx.client_id, sorted(weights)))

    @hookimpl
    def get_trainer_class(self, ctx: Any) -> type:
        self._rec("get_trainer_class", ctx)
        return PingTrainer

    @hookimpl
    def get_runtime(self, ctx: Any) -> None:
        self._rec("get_runtime", ctx)

    @hookimpl
    def aggregate(self, ctx: Any, contributions: Any) -> None:
        self._rec("aggregate", ctx, len(list(contributions)))

    @hookimpl
    def local_train(self, ctx: Any, model: Any, data: Any) -> None:
        self._rec("local_train", ctx, (ctx.client_id, len(data)))

    @hookimpl
    def evaluate(self, ctx: Any, model: Any, data: Any) -> None:
        self._rec("evaluate", ctx, len(data))

    @hookimpl
    def client_request(self, ctx: Any, request: str, payload: bytes) -> bytes | None:
        self._rec("client_request", ctx, (ctx.client_id, request))
        return b"pong " + payload if request == "ping" else None


@pytest.fixture(scope="module")
def spied(tmp_path_factory: pytest.TempPathFactory) -> tuple[Spy, RunResult]:
    spy = Spy()
    job = small_job(
        ["spy"],
        trainer={"delete_local_models_after_aggregation": False},
        job={"rounds": 2, "clients": 2, "keep_round_models": True},
    )
    import os

    from tests.conftest import ROOT

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        result = run_job(
            job, out=tmp_path_factory.mktemp("spy") / "run", extra_plugins={"spy": spy}
        )
    finally:
        os.chdir(cwd)
    return spy, result


def test_hook_check_job(spied: tuple[Spy, RunResult], tmp_path: Path) -> None:
    spy, _ = spied
    assert spy.seen("check_job") == [("check_job", "server", 0, "examples.digits")]
    assert spy.calls[0][0] == "check_job"  # before anything else

    class Refuser:
        @hookimpl
        def check_job(self, ctx: Any) -> None:
            raise JobError("the task needs server_data()")

    with pytest.raises(Exception, match="the task needs server_data"):
        run_job(small_job(["refuser"]), out=tmp_path / "run", extra_plugins={"refuser": Refuser()})
    assert not (tmp_path / "run").exists()


def test_hook_startup(spied: tuple[Spy, RunResult]) -> None:
    spy, _ = spied
    assert [c[0] for c in spy.calls[:5]] == [
        "check_job",
        "get_runtime",
        "get_trainer_class",  # asked once, before training: two answers are a job error
        "startup",
        "client_register",
    ]
    assert spy.seen("startup") == [("startup", "server", 0, None)]


def test_hook_client_register(spied: tuple[Spy, RunResult]) -> None:
    spy, _ = spied
    assert [c[3] for c in spy.seen("client_register")] == ["client-0", "client-1"]


def test_hook_client_quit(spied: tuple[Spy, RunResult]) -> None:
    spy, _ = spied
    assert [c[3] for c in spy.seen("client_quit")] == ["client-0", "client-1"]
    names = [c[0] for c in spy.calls]
    assert names.index("client_quit") > names.index("finish")


def test_hook_shutdown(spied: tuple[Spy, RunResult]) -> None:
    spy, _ = spied
    assert spy.calls[-1][0] == "shutdown"


def test_hook_start_round(spied: tuple[Spy, RunResult]) -> None:
    spy, _ = spied
    assert [(c[2], c[3]) for c in spy.seen("start_round")] == [(1, 0), (2, 0)]


def test_hook_send_global_model(spied: tuple[Spy, RunResult]) -> None:
    spy, result = spied
    sent = [c[3] for c in spy.seen("send_global_model")]
    round1, _ = codec.load_file(result.run_dir / "rounds" / "0001" / "global_model.safetensors")
    assert all(torch.equal(sent[1][k], round1[k]) for k in round1)  # round 2 sends round 1's


def test_hook_receive_contribution(spied: tuple[Spy, RunResult], tmp_path: Path) -> None:
    spy, _ = spied
    assert {c[3][0] for c in spy.seen("receive_contribution") if c[2] == 1} == {
        "client-0",
        "client-1",
    }

    class RefuseClient1:
        @hookimpl
        def receive_contribution(self, ctx: Any, contribution: Any) -> str | None:
            return "on a deny list" if contribution.client_id == "client-1" else None

    result = run_job(
        small_job(["deny"], job={"min_clients": 1}),
        out=tmp_path / "r",
        extra_plugins={"deny": RefuseClient1()},
    )
    assert result.history[0]["clients"] == ["client-0", "client-2"]
    assert result.history[0]["refused"] == ["client-1: deny: on a deny list"]


def test_hook_before_aggregation(spied: tuple[Spy, RunResult]) -> None:
    spy, _ = spied
    assert [c[3] for c in spy.seen("before_aggregation")] == [["client-0", "client-1"]] * 2


def test_hook_after_aggregation(spied: tuple[Spy, RunResult]) -> None:
    spy, result = spied
    for _, _, rnd, weights in spy.seen("after_aggregation"):
        saved, _ = codec.load_file(
            result.run_dir / "rounds" / f"{rnd:04d}" / "global_model.safetensors"
        )
        assert all(torch.equal(weights[k], saved[k]) for k in saved)


def test_hook_test_round(spied: tuple[Spy, RunResult]) -> None:
    spy, _ = spied
    assert [(c[2], c[3]) for c in spy.seen("test_round")] == [(1, False), (2, False)]


def test_hook_end_round(spied: tuple[Spy, RunResult]) -> None:
    spy, result = spied
    ends = spy.seen("end_round")
    assert [c[2] for c in ends] == [1, 2]
    assert "test" in ends[0][3]
    assert [line["spy"] for line in result.history] == [10, 20]  # what handlers add is kept


def test_hook_finish(spied: tuple[Spy, RunResult]) -> None:
    spy, _ = spied
    assert spy.seen("finish") == [("finish", "server", 2, True)]


def test_hook_rollback(tmp_path: Path) -> None:
    log: list[str] = []

    class Keeper:
        def __init__(self, name: str) -> None:
            self.name = name

        @hookimpl
        def after_aggregation(self, ctx: Any) -> None:
            ctx.state[self.name] = ctx.round
            log.append(f"{self.name} after_aggregation {ctx.round}")

        @hookimpl
        def rollback(self, ctx: Any) -> None:
            log.append(f"{self.name} rollback {ctx.state.get(self.name)}")

    class Boom:
        @hookimpl
        def after_aggregation(self, ctx: Any) -> None:
            if ctx.round == 2:
                raise RuntimeError("boom")

    from flcore.training import RunFailed

    with pytest.raises(RunFailed, match="plugin 'boom' raised in 'after_aggregation'"):
        run_job(
            small_job(["k1", "k2", "boom", "k3"], job={"rounds": 3}),
            out=tmp_path / "run",
            extra_plugins={
                "k1": Keeper("k1"),
                "k2": Keeper("k2"),
                "boom": Boom(),
                "k3": Keeper("k3"),
            },
        )
    assert log == [
        "k1 after_aggregation 1",
        "k2 after_aggregation 1",
        "k3 after_aggregation 1",
        "k1 after_aggregation 2",
        "k2 after_aggregation 2",
        "k2 rollback 2",
        "k1 rollback 2",  # reverse order, before the round state is restored
    ]


def test_hook_receive_model(spied: tuple[Spy, RunResult]) -> None:
    spy, _ = spied
    seen = spy.seen("receive_model")
    assert {(c[1], c[2]) for c in seen} == {("client", 1), ("client", 2)}
    assert all(c[3][1] for c in seen)  # weights already loaded into ctx.model


def test_hook_receive_validation_models(spied: tuple[Spy, RunResult]) -> None:
    spy, _ = spied
    seen = spy.seen("receive_validation_models")
    assert {c[1] for c in seen} == {"client"}
    assert all(c[3][1] == ["global", "zeros"] for c in seen)


def test_hook_send_validation_results(spied: tuple[Spy, RunResult]) -> None:
    spy, _ = spied
    # the model the spy added was evaluated too
    assert all(c[3][1] == ["global", "zeros"] for c in spy.seen("send_validation_results"))


def test_hook_send_best_model(spied: tuple[Spy, RunResult]) -> None:
    spy, result = spied
    seen = spy.seen("send_best_model")
    assert sorted(c[3][0] for c in seen) == ["client-0", "client-1"]
    for client in ("client-0", "client-1"):
        best, meta = codec.load_file(result.run_dir / "best_local" / f"{client}.safetensors")
        last, _ = codec.load_file(result.run_dir / "rounds" / "0002" / f"{client}.safetensors")
        assert meta["client_id"] == client
        assert all(torch.equal(best[k], last[k]) for k in last)


def test_hook_get_trainer_class(spied: tuple[Spy, RunResult]) -> None:
    spy, _ = spied
    assert spy.seen("get_trainer_class")


def test_hook_client_request(spied: tuple[Spy, RunResult]) -> None:
    spy, _ = spied
    assert sorted(c[3] for c in spy.seen("client_request")) == [
        ("client-0", "ping"),
        ("client-1", "ping"),
    ]


def test_hook_get_runtime(spied: tuple[Spy, RunResult], tmp_path: Path) -> None:
    spy, _ = spied
    assert len(spy.seen("get_runtime")) >= 1
    with pytest.raises(JobError, match=r"\[job\].runtime: no plugin provides runtime 'ray'"):
        run_job(small_job(job={"runtime": "ray"}), out=tmp_path / "run")


def test_hook_aggregate(spied: tuple[Spy, RunResult], tmp_path: Path) -> None:
    spy, _ = spied
    assert [c[3] for c in spy.seen("aggregate")] == [2, 2]  # asked, answered None, FedAvg ran

    class TakeFirst:
        @hookimpl
        def aggregate(self, ctx: Any, contributions: Any) -> dict:
            return dict(contributions[0].weights)

    result = run_job(
        small_job(
            ["first"],
            job={"rounds": 1, "keep_round_models": True},
            trainer={"delete_local_models_after_aggregation": False},
        ),
        out=tmp_path / "run",
        extra_plugins={"first": TakeFirst()},
    )
    saved = result.run_dir / "global_model.safetensors"
    client0 = result.run_dir / "rounds" / "0001" / "client-0.safetensors"
    assert codec.load_file(saved)[0].keys() == codec.load_file(client0)[0].keys()
    assert all(
        torch.equal(codec.load_file(saved)[0][k], v) for k, v in codec.load_file(client0)[0].items()
    )


def test_hook_local_train(spied: tuple[Spy, RunResult]) -> None:
    spy, result = spied
    seen = spy.seen("local_train")
    assert {c[1] for c in seen} == {"client"} and len(seen) == 4
    assert result.history[-1]["test"]["accuracy"] > 0  # the core's loop still trained


def test_hook_evaluate(spied: tuple[Spy, RunResult]) -> None:
    spy, _ = spied
    seen = spy.seen("evaluate")
    # per round and client: the received model (before training), then two test models
    assert len(seen) == 2 * 2 * 3


def test_hook_predict(job_factory: Any) -> None:
    from flcore.chain import Chain
    from flcore.context import ServerContext
    from flcore.logging import make_logger
    from flcore.task import load_task

    job = job_factory()
    chain = Chain.for_job(job)
    ctx = ServerContext(job=job, task=load_task(job), chain=chain, log=make_logger())
    model = torch.nn.Linear(4, 3)
    out = ctx.ask("predict", model=model, inputs=torch.randn(5, 4), samples=None)
    assert out["probabilities"].shape == (5, 3)
    assert torch.allclose(out["probabilities"].sum(-1), torch.ones(5))
    assert out["prediction"].tolist() == out["probabilities"].argmax(-1).tolist()
    assert (out["predictive_entropy"] >= 0).all()
    assert "no posterior" in out["method"]


def test_the_spy_run_followed_the_dlr_event_order(spied: tuple[Spy, RunResult]) -> None:
    spy, _ = spied
    server = [
        c[0]
        for c in spy.calls
        if c[1] == "server"
        and c[2] == 1
        and c[0] not in {"receive_contribution", "get_trainer_class", "aggregate"}
    ]
    assert server == [
        "start_round",
        "send_global_model",
        "before_aggregation",
        "after_aggregation",
        "test_round",
        "end_round",
    ]
    assert TrainingRoundFinished.__name__ in {"TrainingRoundFinished"}
