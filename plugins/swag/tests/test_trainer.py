"""SWAG rounds in real jobs: the DLR flow, its events through the chain, refusals, rollback."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flcore_swag import Settings, SWAGPlugin
from flcore_swag.collect import schedule, sgd_snapshots
from flcore_swag.moments import ClientMoments
from flcore_swag.posterior import Posterior
from flcore_swag.trainer import SWAGModelTrainer, SWAGRoundFinished
from swag_helpers import flat, flat_columns, swag_job

from flcore import (
    ClientHost,
    ModelTrainer,
    RunFailed,
    decode_tensors,
    derive_seed,
    encode_tensors,
    hookimpl,
    load_tensors,
    run_job,
)
from flcore.logging import make_logger
from flcore.run import prepare
from flcore.trainer import resolve_event


class Recorder:
    """Records the hooks of a SWAG run, with the round they fired in."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.seen: dict[str, Any] = {}

    @hookimpl
    def end_round(self, ctx: Any) -> None:
        self.calls.append(("end_round", ctx.round))

    @hookimpl
    def start_swag_round(self, ctx: Any, swag_round: int) -> None:
        self.calls.append(("start_swag_round", ctx.round))
        self.seen.setdefault("swag_rounds", []).append(swag_round)

    @hookimpl
    def receive_swag_moments(self, ctx: Any, moments: ClientMoments) -> None:
        self.calls.append(("receive_swag_moments", ctx.round))
        self.seen.setdefault("moments", []).append(moments.client_id)

    @hookimpl
    def after_swag_aggregation(self, ctx: Any, posterior: Posterior) -> None:
        self.calls.append(("after_swag_aggregation", ctx.round))
        self.seen.setdefault("posteriors", []).append(posterior)

    @hookimpl
    def end_swag_round(self, ctx: Any) -> None:
        self.calls.append(("end_swag_round", ctx.round))
        ctx.metrics["recorded"] = True

    @hookimpl
    def finish(self, ctx: Any) -> None:
        self.calls.append(("finish", ctx.round))

    @hookimpl
    def get_trainer_class(self, ctx: Any) -> None:
        self.seen["asked_for_trainer"] = True


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Recorder, Any]:
    recorder = Recorder()
    job = swag_job(chain=["recorder", "swag"], swag={"rounds": 2}, job={"keep_round_models": True})
    out = tmp_path_factory.mktemp("recorded") / "run"
    return recorder, run_job(job, out=out, extra_plugins={"recorder": recorder})


def test_swag_rounds_follow_the_training_rounds_in_the_dlr_order(recorded: Any) -> None:
    recorder, _ = recorded
    receives = [("receive_swag_moments", 3)] * 3
    assert recorder.calls == [
        ("end_round", 1),
        ("end_round", 2),
        ("start_swag_round", 3),
        *receives,
        ("after_swag_aggregation", 3),
        ("end_swag_round", 3),
        ("start_swag_round", 4),
        *[("receive_swag_moments", 4)] * 3,
        ("after_swag_aggregation", 4),
        ("end_swag_round", 4),
        ("finish", 4),
    ]


def test_hook_start_swag_round(recorded: Any) -> None:
    assert recorded[0].seen["swag_rounds"] == [1, 2]


def test_hook_receive_swag_moments(recorded: Any) -> None:
    assert recorded[0].seen["moments"] == ["client-0", "client-1", "client-2"] * 2


def test_hook_after_swag_aggregation(recorded: Any) -> None:
    first, second = recorded[0].seen["posteriors"]
    assert first.info["swag_rounds"] == 1 and second.info["swag_rounds"] == 2
    assert second.info["snapshots"] == 2 * first.info["snapshots"]


def test_hook_end_swag_round(recorded: Any) -> None:
    _, result = recorded
    assert [line.get("recorded") for line in result.history] == [None, None, True, True]


def test_the_chain_picks_the_swag_trainer(recorded: Any) -> None:
    assert recorded[0].seen["asked_for_trainer"]
    assert resolve_event("SWAGRoundFinished") is SWAGRoundFinished


def test_metrics_and_the_posterior_land_in_the_run_directory(recorded: Any) -> None:
    _, result = recorded
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2, 3, 4]
    assert [line.get("swag_round") for line in lines] == [None, None, 1, 2]
    swag = lines[2]["swag"]
    assert swag["rank"] == 4 and swag["snapshots"] == 3 * 4  # 4 epochs, a snapshot each
    assert 0 < swag["between_client_share"] < 1 and swag["mean_std"] > 0
    assert lines[2]["clients"] == ["client-0", "client-1", "client-2"]
    posterior = Posterior.load(result.run_dir / "swag.safetensors")
    summary = json.loads((result.run_dir / "swag.json").read_text())
    assert summary["info"] == dict(posterior.info) and summary["rank"] == posterior.rank
    assert posterior.info["swag_rounds"] == 2 and posterior.samples == 8
    checkpoint = json.loads((result.run_dir / "checkpoint.json").read_text())
    assert checkpoint["round"] == 4


def test_swag_rounds_leave_the_global_model_alone(recorded: Any) -> None:
    _, result = recorded
    final = (result.run_dir / "global_model.safetensors").read_bytes()
    trained, _ = load_tensors(result.run_dir / "rounds" / "0002" / "global_model.safetensors")
    for number in ("0003", "0004"):
        kept, _ = load_tensors(result.run_dir / "rounds" / number / "global_model.safetensors")
        assert all(torch.equal(kept[k], trained[k]) for k in trained)
    weights, _ = decode_tensors(final)
    assert all(torch.equal(weights[k], trained[k]) for k in trained)


def test_the_same_job_and_seed_give_the_same_posterior(tmp_path: Path) -> None:
    one = run_job(swag_job(), out=tmp_path / "one")
    two = run_job(swag_job(), out=tmp_path / "two")
    assert (one.run_dir / "swag.safetensors").read_bytes() == (
        two.run_dir / "swag.safetensors"
    ).read_bytes()


def test_one_client_gives_centralised_swag(tmp_path: Path) -> None:
    """A one-client federated SWAG round equals running SWAG on that client's data directly:
    the same SGD from the same global model, its snapshots' moments computed with numpy."""
    job = swag_job(job={"clients": 1}, swag={"epochs": 6, "rank": 3})
    result = run_job(job, out=tmp_path / "run")
    posterior = Posterior.load(result.run_dir / "swag.safetensors")

    (client,) = ClientHost(job.to_toml(), job.source, [0], None, make_logger(None)).clients.values()
    client.model.load_state_dict(load_tensors(result.run_dir / "global_model.safetensors")[0])
    steps, every = schedule(prepare(job).ctx.settings("swag"), len(client.train_data), 32)
    seed = derive_seed(job.job.seed, "swag", 3, "client-0")
    torch.manual_seed(seed)
    shots = [
        {n: p.detach().clone() for n, p in params.items()}
        for params in sgd_snapshots(
            client.model,
            client.train_data,
            torch.nn.functional.cross_entropy,
            lr=0.1,
            momentum=0.9,
            weight_decay=0.0,
            batch_size=32,
            steps=steps,
            snapshot_every=every,
            generator=torch.Generator().manual_seed(seed),
        )
    ]
    names = posterior.names
    matrix = np.stack([flat(s, names) for s in shots])
    assert len(shots) == 6
    np.testing.assert_allclose(flat(dict(posterior.mean), names), matrix.mean(0), atol=1e-14)
    np.testing.assert_allclose(
        flat(dict(posterior.gaussian.var), names),
        np.maximum(matrix.var(0), 1e-30),
        rtol=1e-9,
        atol=1e-18,
    )
    np.testing.assert_allclose(
        flat_columns(dict(posterior.gaussian.dev), names),
        (matrix[-3:] - matrix.mean(0)).T,
        atol=1e-14,
    )


# -- bad clients, failures and rollback ------------------------------------------------


class Saboteur:
    """Answers client-1's SWAG request before the swag plugin can, with bad moments."""

    def __init__(self, how: str) -> None:
        self.how = how

    @hookimpl
    def client_request(
        self, ctx: Any, request: str, payload: bytes | bytearray
    ) -> bytes | bytearray | None:
        if request != "swag_collect" or ctx.client_id != "client-1":
            return None
        if self.how == "garbage":
            return b"\x00" * 40
        honest = SWAGPlugin(ctx.settings("swag")).client_request(ctx, request, payload)
        tensors, meta = decode_tensors(honest)
        if self.how == "nan":
            key = next(k for k in tensors if k.startswith("mean/"))
            tensors[key] = torch.full_like(tensors[key], float("nan"))
        elif self.how == "missing":
            for key in [k for k in tensors if k.endswith("4.bias")]:
                del tensors[key]
            meta["names"] = [n for n in meta["names"] if n != "4.bias"]
        elif self.how == "late":
            meta["round"] = meta["round"] - 1
        return encode_tensors(tensors, meta)


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("garbage", "malformed header"),
        ("nan", "NaN or infinite"),
        ("missing", "no moments for parameters \\['4.bias'\\]"),
        ("late", "moments of round 2; the current round is 3"),
    ],
)
def test_malformed_client_moments_are_refused_and_logged(
    tmp_path: Path, how: str, reason: str
) -> None:
    job = swag_job(chain=["saboteur", "swag"], job={"min_clients": 2})
    result = run_job(job, out=tmp_path / "run", extra_plugins={"saboteur": Saboteur(how)})
    line = result.history[-1]
    assert line["clients"] == ["client-0", "client-2"]
    assert set(line["refused"]) == {"client-1"}
    assert re.search(reason, line["refused"]["client-1"])
    events = [json.loads(x) for x in (result.run_dir / "events.jsonl").read_text().splitlines()]
    refused = [e for e in events if e["event"] == "swag_moments_refused"]
    assert [e["client"] for e in refused] == ["client-1"]
    assert Posterior.load(result.run_dir / "swag.safetensors").info["clients"] == [
        "client-0",
        "client-2",
    ]


class Gatekeeper:
    @hookimpl
    def receive_swag_moments(self, ctx: Any, moments: ClientMoments) -> str | None:
        return "too few snapshots" if moments.client_id == "client-2" else None


def test_a_plugin_may_refuse_moments(tmp_path: Path) -> None:
    job = swag_job(chain=["swag", "gate"], job={"min_clients": 2})
    result = run_job(job, out=tmp_path / "run", extra_plugins={"gate": Gatekeeper()})
    assert result.history[-1]["refused"] == {"client-2": "client-2: gate: too few snapshots"}


def test_too_few_moments_fail_the_run_but_keep_the_trained_model(tmp_path: Path) -> None:
    job = swag_job(chain=["saboteur", "swag"])  # every client is required
    with pytest.raises(RunFailed, match="2 of 3 clients' moments accepted, 3 needed") as err:
        run_job(job, out=tmp_path / "run", extra_plugins={"saboteur": Saboteur("nan")})
    assert "last completed round (2) is kept" in str(err.value)
    assert not (tmp_path / "run" / "swag.safetensors").exists()
    assert json.loads((tmp_path / "run" / "checkpoint.json").read_text())["round"] == 2


class Faulty:
    """Raises in ``end_swag_round`` the first ``times`` times."""

    def __init__(self, times: int) -> None:
        self.times = times
        self.rollbacks = 0

    @hookimpl
    def end_swag_round(self, ctx: Any) -> None:
        if self.times:
            self.times -= 1
            raise RuntimeError("disk full")

    @hookimpl
    def rollback(self, ctx: Any) -> None:
        self.rollbacks += 1


def test_a_failing_handler_rolls_the_swag_round_back(tmp_path: Path) -> None:
    faulty = Faulty(times=1)
    job = swag_job(chain=["swag", "faulty"])
    with pytest.raises(RunFailed, match="plugin 'faulty' raised in 'end_swag_round'"):
        run_job(job, out=tmp_path / "run", extra_plugins={"faulty": faulty})
    run_dir = tmp_path / "run"
    assert not (run_dir / "swag.safetensors").exists()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_retried_swag_round_is_a_swag_round(tmp_path: Path) -> None:
    faulty = Faulty(times=1)
    job = swag_job(chain=["swag", "faulty"], job={"on_error": "retry"})
    result = run_job(job, out=tmp_path / "run", extra_plugins={"faulty": faulty})
    assert [line["round"] for line in result.history] == [1, 2, 3]
    assert result.history[-1]["swag_round"] == 1
    posterior = Posterior.load(result.run_dir / "swag.safetensors")
    assert posterior.info["swag_rounds"] == 1 and posterior.info["snapshots"] == 12


def test_the_swag_trainer_is_only_picked_with_swag_in_the_chain() -> None:
    assert prepare(swag_job()).trainer_class() is SWAGModelTrainer
    assert prepare(swag_job(chain=[])).trainer_class() is ModelTrainer


def test_the_trainer_reads_the_swag_settings_under_any_chain_name() -> None:
    job = swag_job(chain=["uq"], swag=None, plugins={"uq": {"rounds": 3, "rank": 2}})
    training = prepare(job, extra_plugins={"uq": SWAGPlugin})
    trainer = training.trainer_class()(training)
    assert isinstance(trainer, SWAGModelTrainer)
    assert trainer.settings == Settings(rounds=3, rank=2)
