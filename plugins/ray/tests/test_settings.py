"""``[plugins.ray]`` and the job around it: every bad value is refused before Ray starts or
anything trains, with the key named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flcore_ray import RayPlugin, RaySettings
from ray_helpers import ray_job

from flcore import JobError, hookimpl, run_job
from flcore.run import prepare


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"cpus": 1}, r"\[plugins\.ray\]: unknown key 'cpus'; known keys: actors, address"),
        ({"address": "the cluster"}, r"\[plugins\.ray\]: address must be 'auto', 'local'"),
        ({"address": "head:port"}, r"address must be .* got 'head:port'"),
        ({"address": 6379}, r"\[plugins\.ray\]\.address: expected str, got int 6379"),
        ({"cpus_per_client": 0}, r"cpus_per_client must be a finite number above 0, got 0"),
        ({"cpus_per_client": -1.5}, r"cpus_per_client must be a finite number above 0"),
        ({"cpus_per_client": "two"}, r"\.cpus_per_client: expected float, got str 'two'"),
        ({"cpus_per_client": float("inf")}, r"cpus_per_client: must be a finite number, got inf"),
        ({"gpus_per_client": -0.5}, r"gpus_per_client must be a finite number >= 0, got -0.5"),
        ({"gpus_per_client": float("nan")}, r"gpus_per_client: must be a finite number, got nan"),
        ({"actors": 0}, r"actors must be at least 1, got 0"),
        ({"actors": 2.5}, r"\.actors: expected int, got float 2.5"),
        ({"max_restarts": -1}, r"\[plugins\.ray\]\.max_restarts: must be >= 0, got -1"),
        ({"max_restarts": True}, r"\.max_restarts: expected int, got bool True"),
        ({"start_timeout": 0}, r"start_timeout must be a finite number above 0, got 0"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(section: dict[str, Any], message: str) -> None:
    with pytest.raises(JobError, match=message):
        prepare(ray_job(**{"plugins.ray": section}))


@pytest.mark.parametrize(
    "address", ["auto", "local", "127.0.0.1:6379", "head-node.cluster:6379", "ray://head:10001"]
)
def test_addresses_ray_understands_are_accepted(address: str) -> None:
    assert RaySettings(address=address).address == address
    prepare(ray_job(**{"plugins.ray": {"address": address}}))  # nothing started yet


def test_defaults() -> None:
    settings = RayPlugin().settings
    assert settings == RaySettings()
    assert (settings.address, settings.cpus_per_client, settings.gpus_per_client) == (None, 1, 0)
    assert (settings.actors, settings.max_restarts) == (None, 1)


def test_worker_processes_are_refused_on_ray() -> None:
    with pytest.raises(JobError, match=r"plugin 'ray' refuses the job: ray.toml: \[job\]\.workers"):
        prepare(ray_job(job={"workers": 2}))


def test_runtime_ray_without_the_plugin_in_the_chain_is_refused() -> None:
    with pytest.raises(JobError, match=r"\[job\]\.runtime: no plugin provides runtime 'ray'"):
        prepare(ray_job([]))


def test_the_plugin_in_the_chain_with_another_runtime_warns_and_stays_out(tmp_path: Path) -> None:
    job = ray_job(job={"runtime": "embedded", "clients": 3, "rounds": 1})
    run_job(job, out=tmp_path / "run")
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").open()]
    warning = next(e for e in events if e["event"] == "ray_not_used")
    assert "runtime is 'embedded'" in warning["message"]
    assert not any(str(e.get("worker", "")).startswith("ray-") for e in events)


def test_plugins_given_in_python_with_client_hooks_are_refused_before_ray_starts(
    tmp_path: Path,
) -> None:
    class ClientSide:
        @hookimpl
        def receive_model(self, ctx: Any) -> None: ...

    with pytest.raises(JobError, match=r"plugins \['client'\] were given in Python"):
        run_job(
            ray_job(["ray", "client"]), out=tmp_path / "run", extra_plugins={"client": ClientSide()}
        )
    import ray

    assert not ray.is_initialized()
