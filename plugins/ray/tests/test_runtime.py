"""The Ray runtime on a local two-CPU Ray instance: the embedded runtime's weights, byte for
byte, with 100 virtual clients; an actor killed in the middle of a round; actors that cannot
be placed."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from flcore_ray import RaySettings
from flcore_ray.runtime import RayRuntime
from ray_helpers import ray_job

from flcore import FLCoreError, hookimpl, run_job

pytestmark = pytest.mark.usefixtures("local_ray")


def _events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def _rounds(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _cpus_back(expected: float, timeout: float = 60.0) -> bool:
    """Whether the cluster's CPUs are all free again (actors are killed asynchronously)."""
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0.0) >= expected:
            return True
        time.sleep(0.2)
    return False


def test_100_clients_on_ray_give_the_embedded_runtimes_weights(tmp_path: Path) -> None:
    embedded = run_job(ray_job([], job={"runtime": "embedded"}), out=tmp_path / "embedded")
    on_ray = run_job(ray_job(), out=tmp_path / "ray")
    assert on_ray.global_model_path.read_bytes() == embedded.global_model_path.read_bytes()
    assert on_ray.history[-1]["test"] == embedded.history[-1]["test"]
    assert on_ray.history[-1]["clients"] == [f"client-{i}" for i in range(100)]
    # two actors: two CPUs, one per client
    started = next(e for e in _events(tmp_path / "ray") if e["event"] == "ray_actors")
    assert (started["actors"], started["clients"]) == (2, 100)
    assert _cpus_back(2.0), "the run's actors still hold the cluster's CPUs"


def test_clients_are_named_as_the_job_names_them(tmp_path: Path) -> None:
    names = ["hospital-a", "hospital-b", "hospital-c", "hospital-d"]
    job = ray_job(job={"clients": 4, "rounds": 1, "allowed_clients": names})
    result = run_job(job, out=tmp_path / "run")
    assert result.history[-1]["clients"] == names
    started = [e for e in _events(tmp_path / "run") if e["event"] == "ray_actor_started"]
    assert sorted(c for e in started for c in e["clients"]) == names  # the actors' own log
    assert _cpus_back(2.0)


class KillActor:
    """Server side only: in round ``round``, holds client-1 (actor 1's first client) on a
    marker file, and kills actor 1's process with SIGKILL once the first contribution is in.
    ``runtime`` is the run's, which the test hands to ``run_job``: it knows the actors' pids."""

    def __init__(self, marker: Path, round: int, runtime: RayRuntime) -> None:
        self.marker, self.round, self.runtime, self.killed = marker, round, runtime, False

    @hookimpl
    def send_global_model(self, ctx: Any) -> None:
        if ctx.round == self.round:
            self.marker.touch()

    @hookimpl
    def receive_contribution(self, ctx: Any) -> None:
        if ctx.round == self.round and not self.killed:
            self.killed = True
            os.kill(self.runtime.pids[1], signal.SIGKILL)
            self.marker.unlink()


@pytest.mark.parametrize("max_restarts", [1, 0])
def test_an_actor_killed_mid_round_fails_only_its_clients(
    tmp_path: Path, max_restarts: int
) -> None:
    marker = tmp_path / "stall"
    settings = {"actors": 2, "max_restarts": max_restarts}
    job = ray_job(
        ["ray", "kill"],
        job={"task": "ray_tasks", "clients": 12, "rounds": 3, "min_clients": 4},
        task={"stall_client": 1, "stall_marker": str(marker)},
        **{"plugins.ray": settings},
    )
    runtime = RayRuntime(RaySettings(**settings))
    killer = KillActor(marker, round=2, runtime=runtime)
    result = run_job(job, out=tmp_path / "run", extra_plugins={"kill": killer}, runtime=runtime)
    assert killer.killed
    rounds = _rounds(tmp_path / "run")
    everyone = [f"client-{i}" for i in range(12)]
    evens = everyone[::2]  # actor 0's clients; actor 1 holds the odd ones
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["clients"] == everyone
    assert rounds[1]["clients"] == evens
    assert len(rounds[1]["refused"]) == 6
    assert all("its Ray actor died" in reason for reason in rounds[1]["refused"])
    if max_restarts:  # restarted, with its clients' data loaded again: back in round 3
        assert rounds[2]["clients"] == everyone
    else:  # gone for good: its clients are dropped from every later round
        assert rounds[2]["clients"] == evens
        assert all("Ray actor" in reason for reason in rounds[2]["refused"])
    assert result.history[-1]["test"]["accuracy"] > 0
    assert _cpus_back(2.0)


def test_actors_the_cluster_cannot_place_stop_the_run_before_training(tmp_path: Path) -> None:
    job = ray_job(**{"plugins.ray": {"cpus_per_client": 4, "start_timeout": 3}})
    with pytest.raises(FLCoreError, match=r"did not start within 3 s.*start_timeout"):
        run_job(job, out=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert _cpus_back(2.0)


def test_actors_that_cannot_load_their_clients_stop_the_run_before_training(
    tmp_path: Path,
) -> None:
    job = ray_job(job={"task": "ray_tasks", "clients": 4}, task={"broken_data": True})
    with pytest.raises(
        FLCoreError, match=r"Ray actor 0 could not start: RuntimeError: no data for client 0"
    ):
        run_job(job, out=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert _cpus_back(2.0)
