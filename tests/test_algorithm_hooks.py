"""The hooks algorithms compose on, each checked against an update computed by hand on the
one-weight task of ``tests/linear_task.py`` (w0 = 1, loss w^2, gradient 2w), then composed.

Without plugins two SGD steps at lr 0.1 give w1 = 0.8, w2 = 0.64.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from flcore import hookimpl
from flcore.job import Job
from flcore.run import run_job
from flcore.training import RunFailed
from tests.fixtures.test_plugins.flcore_test_plugins.algorithms import (
    ClipAfterStep,
    Proximal,
    RoundCounter,
    ServerMomentum,
)


def linear_job(chain: list[str], rounds: int = 1, clients: int = 1, **plugins: Any) -> Job:
    data: dict[str, Any] = {
        "job": {
            "name": "linear",
            "task": "tests.linear_task",
            "rounds": rounds,
            "clients": clients,
        },
        "trainer": {"skip_model_tests": True},
        "local": {"epochs": 2, "batch_size": 1, "lr": 0.1, "validation_split": 0.0},
        "plugins": {"chain": chain, **plugins},
    }
    return Job.from_dict(data, source="linear.toml")


def final_weight(result: Any) -> float:
    from flcore import codec

    weights, _ = codec.load_file(result.global_model_path)
    return float(weights["weight"].item())


PLUGINS = {
    "proximal": Proximal,
    "clip": ClipAfterStep,
    "momentum": ServerMomentum,
    "counter": RoundCounter,
}


def test_the_plain_loop_is_two_sgd_steps(tmp_path: Path) -> None:
    result = run_job(linear_job([]), out=tmp_path / "run")
    assert final_weight(result) == pytest.approx(0.64)


def test_hook_local_loss_term(tmp_path: Path) -> None:
    """The proximal term is added to the loss."""
    # step 2: gradient 2 * 0.8 + mu * (0.8 - 1) = 1.4 with mu = 1, so w2 = 0.8 - 0.14
    job = linear_job(["proximal"], **{"proximal": {"mu": 1.0}})
    result = run_job(job, out=tmp_path / "run", extra_plugins=PLUGINS)
    assert final_weight(result) == pytest.approx(0.66)


def test_hook_after_optimizer_step(tmp_path: Path) -> None:
    """A clip after each step."""
    # step 1: 0.8 clamped to 0.7; step 2: 0.7 - 0.1 * 1.4 = 0.56
    job = linear_job(["clip"], **{"clip": {"bound": 0.7}})
    result = run_job(job, out=tmp_path / "run", extra_plugins=PLUGINS)
    assert final_weight(result) == pytest.approx(0.56)


@pytest.mark.parametrize("chain", [["proximal", "clip"], ["clip", "proximal"]])
def test_a_proximal_term_and_a_clip_after_step_compose(tmp_path: Path, chain: list[str]) -> None:
    # step 1: 0.8 -> 0.7; step 2: gradient 1.4 + (0.7 - 1) = 1.1, so 0.7 - 0.11 = 0.59
    job = linear_job(chain, **{"proximal": {"mu": 1.0}, "clip": {"bound": 0.7}})
    result = run_job(job, out=tmp_path / "run", extra_plugins=PLUGINS)
    assert final_weight(result) == pytest.approx(0.59)


def test_hook_local_optimizer(tmp_path: Path) -> None:
    class HalfRate:
        @hookimpl
        def local_optimizer(self, ctx: Any, model: Any) -> Any:
            return torch.optim.SGD(model.parameters(), lr=0.05)

    # w -> 0.9 w per step: 0.81
    result = run_job(linear_job(["half"]), out=tmp_path / "run", extra_plugins={"half": HalfRate()})
    assert final_weight(result) == pytest.approx(0.81)


def test_a_local_optimizer_that_is_no_optimizer_fails_the_round(tmp_path: Path) -> None:
    class Wrong:
        @hookimpl
        def local_optimizer(self, ctx: Any, model: Any) -> Any:
            return "adam"

    with pytest.raises(RunFailed, match="local_optimizer answered 'adam', not a torch optimizer"):
        run_job(linear_job(["wrong"]), out=tmp_path / "run", extra_plugins={"wrong": Wrong()})


def test_hook_server_update(tmp_path: Path) -> None:
    """FedAvgM's server step, by hand."""
    # round 1: aggregate 0.64, v = 0.36, x = 0.64; round 2: aggregate 0.4096,
    # v = 0.9 * 0.36 + 0.2304 = 0.5544, x = 0.64 - 0.5544 = 0.0856
    job = linear_job(["momentum"], rounds=2, **{"momentum": {"beta": 0.9, "lr": 1.0}})
    result = run_job(job, out=tmp_path / "run", extra_plugins=PLUGINS)
    assert final_weight(result) == pytest.approx(0.0856, abs=1e-6)


def test_a_server_update_with_a_wrong_shape_fails_the_round(tmp_path: Path) -> None:
    class Bad:
        @hookimpl
        def server_update(self, ctx: Any, previous: Any) -> Any:
            return {"weight": torch.zeros(2, 2)}

    with pytest.raises(RunFailed, match="server_update returned a bad model"):
        run_job(linear_job(["bad"]), out=tmp_path / "run", extra_plugins={"bad": Bad()})


def test_a_server_update_with_tensor_state_resumes_byte_identically(tmp_path: Path) -> None:
    settings = {"momentum": {"beta": 0.5, "lr": 1.0}}
    whole = run_job(
        linear_job(["momentum"], rounds=4, **settings), tmp_path / "whole", extra_plugins=PLUGINS
    )

    class StopAfter2(ServerMomentum):
        @hookimpl
        def start_round(self, ctx: Any) -> None:
            if ctx.round == 3:
                raise RuntimeError("the server died")

    cut = linear_job(["momentum"], rounds=4, **settings)
    with pytest.raises(RunFailed):
        run_job(cut, tmp_path / "cut", extra_plugins={**PLUGINS, "momentum": StopAfter2})
    assert (tmp_path / "cut" / "plugin_state" / "0002.safetensors").is_file()
    resumed = run_job(cut, tmp_path / "cut", extra_plugins=PLUGINS, resume=True)
    assert resumed.global_model_path.read_bytes() == whole.global_model_path.read_bytes()


def test_hook_send_update(tmp_path: Path) -> None:
    """Filters the outgoing update, in chain order, never the client's model."""
    seen: list[float] = []

    class Halve:
        @hookimpl
        def send_update(self, ctx: Any, weights: dict[str, Any]) -> None:
            weights["weight"] = weights["weight"] * 0.5

    class Record:
        @hookimpl
        def send_update(self, ctx: Any, weights: dict[str, Any]) -> None:
            seen.append(float(weights["weight"].item()))
            seen.append(float(ctx.model.weight.item()))

    job = linear_job(["halve", "record"])
    result = run_job(job, tmp_path / "run", extra_plugins={"halve": Halve(), "record": Record()})
    assert seen == pytest.approx([0.32, 0.64])  # the later filter sees the earlier one's work
    assert final_weight(result) == pytest.approx(0.32)


def test_an_update_filter_that_changes_a_shape_fails_that_client(tmp_path: Path) -> None:
    class Grow:
        @hookimpl
        def send_update(self, ctx: Any, weights: dict[str, Any]) -> None:
            weights["weight"] = torch.zeros(3)

    with pytest.raises(RunFailed, match="send_update made 'weight'"):
        run_job(linear_job(["grow"]), tmp_path / "run", extra_plugins={"grow": Grow()})


def test_receive_contribution_may_replace_weights_and_later_handlers_see_them(
    tmp_path: Path,
) -> None:
    seen: list[float] = []

    class Clamp:
        @hookimpl
        def receive_contribution(self, ctx: Any, contribution: Any) -> None:
            contribution.weights["weight"] = contribution.weights["weight"].clamp(max=0.5)

    class Look:
        @hookimpl
        def receive_contribution(self, ctx: Any, contribution: Any) -> None:
            seen.append(float(contribution.weights["weight"].item()))

    job = linear_job(["clamp", "look"])
    result = run_job(job, tmp_path / "run", extra_plugins={"clamp": Clamp(), "look": Look()})
    assert seen == [0.5] and final_weight(result) == 0.5


def test_a_server_filter_that_leaves_a_nan_refuses_the_contribution(tmp_path: Path) -> None:
    class Poison:
        @hookimpl
        def receive_contribution(self, ctx: Any, contribution: Any) -> None:
            contribution.weights["weight"] = torch.full((1, 1), float("nan"))

    with pytest.raises(RunFailed, match="after receive_contribution: client-0: tensor 'weight'"):
        run_job(linear_job(["poison"]), tmp_path / "run", extra_plugins={"poison": Poison()})


def test_a_global_model_that_is_not_finite_fails_the_round_and_keeps_the_last(
    tmp_path: Path,
) -> None:
    from flcore import codec

    class Overflow:  # two finite contributions whose mean is inf, as two colluders can send
        @hookimpl
        def server_update(self, ctx: Any, previous: Any) -> Any:
            if ctx.round == 2:
                return {"weight": torch.full((1, 1), float("inf"))}
            return None

    job = linear_job(["overflow"], rounds=2)
    with pytest.raises(RunFailed, match=r"round 2: server_update returned a bad model: NaN or"):
        run_job(job, tmp_path / "run", extra_plugins={"overflow": Overflow()})
    weights, meta = codec.load_file(tmp_path / "run" / "global_model.safetensors")
    assert meta["round"] == 1 and float(weights["weight"].item()) == pytest.approx(0.64)
