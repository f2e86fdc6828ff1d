"""Real runs through the trainer: validation of contributions, error policies, options."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from flcore import codec, hookimpl
from flcore.context import ServerContext
from flcore.contribution import Contribution
from flcore.run import run_job
from flcore.runtime.base import ClientResult
from flcore.runtime.embedded import EmbeddedRuntime
from flcore.training import RunFailed
from tests.conftest import small_job


def events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class TamperingRuntime(EmbeddedRuntime):
    """The embedded runtime, where clients 1-10 send one forged reply of every bad kind in
    round 1, a stranger chimes in, and client-0's reply arrives twice."""

    def run(
        self, ctx: ServerContext, request: str, payload: bytes, clients: Sequence[str]
    ) -> Iterator[ClientResult]:
        replies = list(super().run(ctx, request, payload, clients))
        if request != "train" or ctx.round != 1:
            yield from replies
            return
        good = Contribution.decode(replies[0].payload or b"", "client-0")
        w = dict(good.weights)
        name = "0.weight"  # a matrix, so that a reshape changes its shape

        def forged(client: str, **changes: Any) -> bytes:
            fields = {
                "client_id": client,
                "round": 1,
                "weights": w,
                "num_samples": 5,
                "local_iterations": 1,
                "metrics": {},
            }
            fields.update(changes)
            return bytes(Contribution(**fields).encode())

        nan = {**w, name: torch.full_like(w[name], float("nan"))}
        bad = [
            ("client-1", forged("client-1", round=0)),
            ("client-2", forged("client-2", weights={k: v for k, v in w.items() if k != name})),
            ("client-3", forged("client-3", weights={**w, "extra": torch.zeros(1)})),
            ("client-4", forged("client-4", weights={**w, name: w[name].reshape(-1)})),
            ("client-5", forged("client-5", weights={**w, name: w[name].double()})),
            ("client-6", forged("client-6", weights=nan)),
            ("client-7", forged("client-7", num_samples=0)),
            ("client-8", forged("client-2")),
            ("client-9", forged("client-9")[:-10]),
            ("client-10", None),
        ]
        yield replies[0]
        yield ClientResult("mallory", forged("mallory"))
        for client, reply in bad:
            yield ClientResult(client, reply, None if reply else "connection reset")
        yield replies[11]
        yield ClientResult("client-0", replies[0].payload)  # a duplicate
        yield replies[1]  # a genuine reply after a refused one does not count either


class Tamper:
    @hookimpl
    def get_runtime(self, ctx: Any) -> Any:
        return TamperingRuntime()


def test_each_bad_contribution_is_refused_with_its_reason_and_the_round_completes(
    tmp_path: Path,
) -> None:
    result = run_job(
        small_job(["tamper"], job={"rounds": 2, "clients": 12, "min_clients": 2}),
        out=tmp_path / "run",
        extra_plugins={"tamper": Tamper()},
    )
    first = result.history[0]
    assert first["clients"] == ["client-0", "client-11"]
    reasons = first["refused"]
    expected = [
        "unknown client 'mallory'",
        "client-1: wrong round 0 (late; the current round is 1)",
        "client-2: missing tensors ['0.weight']",
        "client-3: unexpected tensors ['extra']",
        "client-4: tensor '0.weight' has shape",
        "client-5: tensor '0.weight' has dtype torch.float64, expected torch.float32",
        "client-6: tensor '0.weight' has NaN or infinite values",
        "client-7: non-positive sample count 0",
        "client-8: claims to be 'client-2'",
        "contribution from client-9: malformed or truncated tensors",
        "client-10: client failed: connection reset",
        "client-0: duplicate reply for round 1",
        "client-1: duplicate reply for round 1",
    ]
    assert len(reasons) == len(expected), reasons
    for reason, part in zip(reasons, expected, strict=True):
        assert part in reason
    logged = [e["reason"] for e in events(result.run_dir) if e["event"] == "contribution_refused"]
    assert logged == reasons
    assert [m["round"] for m in metrics(result.run_dir)] == [1, 2]
    assert len(result.history[1]["clients"]) == 12  # the next round is untouched


class FailingClient:
    @hookimpl
    def local_train(self, ctx: Any, model: Any, data: Any) -> None:
        if ctx.client_id == "client-1":
            raise RuntimeError("out of memory")


def test_a_failing_client_is_left_out_when_enough_others_contribute(tmp_path: Path) -> None:
    result = run_job(
        small_job(["fail"], job={"min_clients": 2}),
        out=tmp_path / "run",
        extra_plugins={"fail": FailingClient()},
    )
    assert result.history[0]["clients"] == ["client-0", "client-2"]
    assert "client failed" in result.history[0]["refused"][0]
    assert "out of memory" in result.history[0]["refused"][0]


def test_too_few_contributions_fail_the_round_and_keep_the_previous_model(tmp_path: Path) -> None:
    class FailInRound2:
        @hookimpl
        def local_train(self, ctx: Any, model: Any, data: Any) -> None:
            if ctx.round == 2 and ctx.client_id != "client-0":
                raise RuntimeError("disk full")

    out = tmp_path / "run"
    with pytest.raises(RunFailed) as err:
        run_job(
            small_job(["f"], job={"rounds": 3, "min_clients": 2, "keep_round_models": True}),
            out=out,
            extra_plugins={"f": FailInRound2()},
        )
    message = str(err.value)
    assert "Round 2 failed" in message and "1 of 3 contributions accepted, 2 needed" in message
    assert "last completed round (1) is kept" in message
    assert (out / "global_model.safetensors").read_bytes() == (
        out / "rounds" / "0001" / "global_model.safetensors"
    ).read_bytes()
    assert [m["round"] for m in metrics(out)] == [1]


def test_the_retry_policy_reruns_a_failed_round(tmp_path: Path) -> None:
    class FailOnce:
        def __init__(self) -> None:
            self.failed = False
            self.rolled_back = 0

        @hookimpl
        def after_aggregation(self, ctx: Any) -> None:
            ctx.state["seen"] = ctx.state.get("seen", 0) + 1
            if ctx.round == 2 and not self.failed:
                self.failed = True
                raise RuntimeError("flaky")

    plugin = FailOnce()
    result = run_job(
        small_job(["once"], job={"rounds": 3, "on_error": "retry"}),
        out=tmp_path / "run",
        extra_plugins={"once": plugin},
    )
    assert [m["round"] for m in result.history] == [1, 2, 3]
    assert any(e["event"] == "round_retry" for e in events(result.run_dir))


def test_the_same_job_and_seed_give_byte_identical_models(tmp_path: Path) -> None:
    job = small_job(job={"rounds": 2})
    a = run_job(job, out=tmp_path / "a").global_model_path.read_bytes()
    b = run_job(job, out=tmp_path / "b").global_model_path.read_bytes()
    c = run_job(small_job(job={"rounds": 2, "seed": 1}), out=tmp_path / "c")
    assert a == b
    assert a != c.global_model_path.read_bytes()


def test_one_client_one_round_equals_training_directly(tmp_path: Path) -> None:
    """FedAvg of one contribution is that client's model: compare with a plain torch loop."""
    from examples.digits import Task
    from flcore.data import derive_seed

    job = small_job(
        job={"rounds": 1, "clients": 1, "seed": 7},
        local={"validation_split": 0.0, "epochs": 2, "lr": 0.1},
    )
    result = run_job(job, out=tmp_path / "run")
    fed, _ = codec.load_file(result.global_model_path)

    task = Task(hidden=16)
    threads = torch.get_num_threads()
    torch.set_num_threads(job.job.threads)  # as the clients train: results depend on it
    torch.manual_seed(7)
    model = task.model()
    data = task.client_data(0, 1)
    x, y = data.tensors
    seed = derive_seed(7, "train", 1, "client-0")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), 32):
            idx = order[start : start + 32]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    torch.set_num_threads(threads)
    direct = model.state_dict()
    assert set(fed) == set(direct)
    for name, tensor in direct.items():
        assert torch.equal(fed[name], tensor), name


def test_skip_model_tests_never_tests(tmp_path: Path) -> None:
    result = run_job(small_job(trainer={"skip_model_tests": True}), out=tmp_path / "run")
    assert all("test" not in m for m in result.history)


def test_tests_only_after_the_last_round_when_asked(tmp_path: Path) -> None:
    result = run_job(
        small_job(job={"rounds": 3}, trainer={"model_test_after_each_round": False}),
        out=tmp_path / "run",
    )
    assert ["test" in m for m in result.history] == [False, False, True]


def test_local_models_are_kept_only_when_asked(tmp_path: Path) -> None:
    kept = run_job(
        small_job(trainer={"delete_local_models_after_aggregation": False}), out=tmp_path / "kept"
    )
    files = sorted(
        p.relative_to(kept.run_dir).as_posix() for p in kept.run_dir.rglob("client-*.safetensors")
    )
    assert files == [
        f"{d}/client-{i}.safetensors"
        for d in ("best_local", "rounds/0001", "rounds/0002")
        for i in range(3)
    ]
    dropped = run_job(small_job(), out=tmp_path / "dropped")
    assert not list(dropped.run_dir.rglob("client-*.safetensors"))


def test_trainer_events_can_be_processed_by_name(tmp_path: Path) -> None:
    from flcore.errors import FLCoreError
    from flcore.trainer import ModelTrainerEvent, process_trainer_task, resolve_event

    assert resolve_event("TrainingRoundFinished").__name__ == "TrainingRoundFinished"
    assert resolve_event("flcore.trainer.ModelTestFinished").__name__ == "ModelTestFinished"
    with pytest.raises(FLCoreError, match=r"unknown trainer event 'os\.system'"):
        resolve_event("os.system")
    with pytest.raises(FLCoreError, match="is not a trainer event"):
        resolve_event(dict)  # type: ignore[arg-type]
    with pytest.raises(FLCoreError, match="unknown trainer event 'Nope'"):
        process_trainer_task(None, "Nope")  # type: ignore[arg-type]
    assert issubclass(resolve_event("TrainingRoundFinished"), ModelTrainerEvent)


def test_a_trainer_class_from_a_plugin_runs_the_training(tmp_path: Path) -> None:
    from flcore.trainer import ModelTrainer

    class CountingTrainer(ModelTrainer):
        rounds_started = 0

        def start_round(self) -> None:
            CountingTrainer.rounds_started += 1
            super().start_round()

    class Picks:
        @hookimpl
        def get_trainer_class(self, ctx: Any) -> type:
            return CountingTrainer

    run_job(
        small_job(["picks"], job={"rounds": 3}),
        out=tmp_path / "run",
        extra_plugins={"picks": Picks()},
    )
    assert CountingTrainer.rounds_started == 3

    class PicksJunk:
        @hookimpl
        def get_trainer_class(self, ctx: Any) -> type:
            return dict

    from flcore.errors import FLCoreError

    with pytest.raises(FLCoreError, match="not a ModelTrainer class"):
        run_job(small_job(["junk"]), out=tmp_path / "junk", extra_plugins={"junk": PicksJunk()})


def test_an_aggregate_with_a_wrong_model_fails_the_round(tmp_path: Path) -> None:
    class Wrong:
        @hookimpl
        def aggregate(self, ctx: Any, contributions: Any) -> dict:
            return {"x": torch.zeros(1)}

    with pytest.raises(RunFailed, match="aggregate returned a bad model: names differ"):
        run_job(small_job(["w"]), out=tmp_path / "run", extra_plugins={"w": Wrong()})


def test_a_run_directory_holds_the_contract(tmp_path: Path) -> None:
    result = run_job(small_job(), out=tmp_path / "run")
    names = {p.name for p in result.run_dir.iterdir()}
    assert names == {
        "job.toml",
        "events.jsonl",
        "metrics.jsonl",
        "global_model.safetensors",
        "checkpoint.json",
        "summary.json",
    }
    _, meta = codec.load_file(result.global_model_path)
    assert meta["round"] == 2
    assert json.loads((result.run_dir / "checkpoint.json").read_text())["round"] == 2
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final"]["round"] == 2
    with pytest.raises(Exception, match="exists and is not empty"):
        run_job(small_job(), out=tmp_path / "run")
