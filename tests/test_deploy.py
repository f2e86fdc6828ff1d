"""Deployment end to end: real `flcore server` and `flcore client` processes over gRPC with
mutual TLS on 127.0.0.1 (the checks of issue 7)."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from flcore.job import Job
from flcore.run import run_job
from tests.conftest import small_job
from tests.deploy_support import Deployment, deployment_in, events, metrics, wait_for

NAMES = ("client-0", "client-1", "client-2")
#: Digits, but the client named by FLCORE_TEST_CRASH dies once its round-1 contribution is sent.
CRASH_TASK = "tests.deploy_crash_task"


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    with deployment_in(tmp_path) as dep:
        yield dep


def checkpoint_round(run_dir: Path) -> int:
    path = run_dir / "checkpoint.json"
    try:
        return int(json.loads(path.read_text())["round"])
    except (OSError, ValueError, KeyError):  # not written yet (it is replaced atomically)
        return 0


def names_of(run_dir: Path, event: str) -> list[str]:
    return [e["client"] for e in events(run_dir) if e["event"] == event]


def kill_client_2_after_round_1(
    deployment: Deployment, job: Job, run: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[subprocess.Popen[bytes], list[subprocess.Popen[bytes]]]:
    """Serve ``job`` (on CRASH_TASK) to the three clients of NAMES, client-2 of which is
    killed (SIGKILL) once its round-1 contribution is sent. Returns the server's process and
    the clients'."""
    assert job.job.task == CRASH_TASK
    return serve_marking_one(deployment, job, run, monkeypatch, "FLCORE_TEST_CRASH", 2)


def serve_marking_one(
    deployment: Deployment,
    job: Job,
    run: Path,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    marked: int,
) -> tuple[subprocess.Popen[bytes], list[subprocess.Popen[bytes]]]:
    """Serve ``job`` to the clients of NAMES, only the ``marked``-th of which has the
    environment ``variable`` (which a test task reads) set to its index."""
    deployment.certs(clients=NAMES)
    job_file = deployment.job(job)
    server, address = deployment.server(job_file, run)
    clients = []
    for index, name in enumerate(NAMES):
        if index == marked:
            monkeypatch.setenv(variable, str(index))
        clients.append(deployment.client(address, name, job_file))
        monkeypatch.delenv(variable, raising=False)
    return server, clients


def test_three_clients_reach_the_embedded_runs_bytes(
    deployment: Deployment, tmp_path: Path
) -> None:
    job = small_job(job={"rounds": 3, "heartbeat_interval": 2.0})
    deployment.certs(clients=NAMES)
    job_file = deployment.job(job)
    server, address = deployment.server(job_file, tmp_path / "run")
    clients = [deployment.client(address, name, job_file) for name in NAMES]
    assert deployment.wait(server) == 0, deployment.log(server)
    for client in clients:
        assert deployment.wait(client) == 0, deployment.log(client)
        assert "the run ended" in deployment.log(client)
    embedded = run_job(job, out=tmp_path / "embedded")
    deployed = (tmp_path / "run" / "global_model.safetensors").read_bytes()
    assert deployed == embedded.global_model_path.read_bytes()
    assert sorted(names_of(tmp_path / "run", "client_register")) == list(NAMES)
    assert sorted(names_of(tmp_path / "run", "client_quit")) == list(NAMES)
    assert [m["clients"] for m in metrics(tmp_path / "run")] == [list(NAMES)] * 3


def test_clients_outside_the_federation_are_refused(deployment: Deployment, tmp_path: Path) -> None:
    job = small_job(job={"rounds": 1, "clients": 2, "heartbeat_interval": 2.0})
    deployment.certs(clients=("client-0", "client-1", "intruder"))
    evil = deployment.certs("evil", clients=("client-0",))  # another CA, an allowed name
    job_file = deployment.job(job)
    run = tmp_path / "run"
    server, address = deployment.server(job_file, run)
    # a certificate from another CA: refused at the TLS handshake
    forged = deployment.client(
        address,
        "client-0",
        job_file,
        "--cert",
        str(evil / "client-0" / "client-0.pem"),
        "--key",
        str(evil / "client-0" / "client-0.key"),
        "--give-up-after",
        "3",
    )
    # the federation's CA, a name the job does not allow: refused at registration
    intruder = deployment.client(
        address,
        "client-1",
        job_file,
        "--cert",
        str(tmp_path / "certs" / "intruder" / "intruder.pem"),
        "--key",
        str(tmp_path / "certs" / "intruder" / "intruder.key"),
    )
    assert deployment.wait(intruder) == 1
    assert "'intruder' is not allowed by the job" in deployment.log(intruder)
    assert deployment.wait(forged) == 1
    assert "TLS handshake" in deployment.log(forged)
    wait_for(
        lambda: "Handshake failed" in deployment.log(server), "the server to log the handshake"
    )
    assert "certificate" in deployment.log(server).split("Handshake failed", 1)[1].splitlines()[0]
    refused = [e for e in events(run) if e["event"] == "client_refused"]
    assert [e["client"] for e in refused] == ["intruder"]
    assert "not allowed" in refused[0]["reason"]
    for name in ("client-0", "client-1"):
        deployment.client(address, name, job_file)
    assert deployment.wait(server) == 0, deployment.log(server)
    assert sorted(names_of(run, "client_register")) == ["client-0", "client-1"]
    # no hook saw them: the only events that name the intruder are its refusal
    assert [e["event"] for e in events(run) if "intruder" in json.dumps(e)] == ["client_refused"]


def test_a_client_killed_mid_run_is_dropped_and_the_run_finishes(
    deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = small_job(
        job={
            "task": CRASH_TASK,
            "rounds": 3,
            "min_clients": 2,
            "heartbeat_interval": 2.0,
            "round_timeout": 120,
        }
    )
    run = tmp_path / "run"
    server, clients = kill_client_2_after_round_1(deployment, job, run, monkeypatch)
    assert deployment.wait(server) == 0, deployment.log(server)
    lines = metrics(run)
    assert [m["round"] for m in lines] == [1, 2, 3]
    assert lines[0]["clients"] == list(NAMES)
    assert lines[-1]["clients"] == ["client-0", "client-1"]
    dropped = [e for e in events(run) if e["event"] == "client_dropped"]
    assert [e["client"] for e in dropped] == ["client-2"]
    assert "no heartbeat" in dropped[0]["reason"]
    quits = names_of(run, "client_quit")
    assert sorted(quits) == list(NAMES) and quits.count("client-2") == 1
    for client in clients[:2]:
        assert deployment.wait(client) == 0


def test_a_server_killed_after_round_3_resumes_to_the_same_bytes(
    deployment: Deployment, tmp_path: Path
) -> None:
    # rounds long enough (~0.5 s) that the kill lands before round 6 on a fast machine too
    job = small_job(job={"rounds": 6, "heartbeat_interval": 2.0}, local={"epochs": 25})
    deployment.certs(clients=NAMES)
    job_file = deployment.job(job)
    run = tmp_path / "run"
    server, address = deployment.server(job_file, run)
    clients = [deployment.client(address, name, job_file) for name in NAMES]
    wait_for(lambda: checkpoint_round(run) >= 3, "round 3's checkpoint")
    server.send_signal(signal.SIGKILL)
    server.wait()
    assert checkpoint_round(run) < 6, "the run finished before the kill: nothing to resume"
    port = int(address.rsplit(":", 1)[1])
    again, _ = deployment.server(job_file, run, "--resume", port=port, log="resumed.log")
    assert deployment.wait(again) == 0, deployment.log(again)
    for client in clients:
        assert deployment.wait(client) == 0, deployment.log(client)
    assert [m["round"] for m in metrics(run)] == [1, 2, 3, 4, 5, 6]
    whole = run_job(job, out=tmp_path / "whole")
    assert (run / "global_model.safetensors").read_bytes() == whole.global_model_path.read_bytes()
    assert any(e["event"] == "run_resumed" for e in events(run))


def test_a_model_above_100_mb_crosses_both_ways(deployment: Deployment, tmp_path: Path) -> None:
    import torch

    from flcore import codec
    from tests.deploy_big_task import BALLAST, Task

    job = small_job(
        job={"task": "tests.deploy_big_task", "rounds": 1, "clients": 1},
        trainer={"skip_model_tests": True},
    )
    job = type(job).from_dict({**job.raw, "task": {}}, source="big.toml")
    deployment.certs(clients=("client-0",))
    job_file = deployment.job(job)
    run = tmp_path / "run"
    server, address = deployment.server(job_file, run)
    client = deployment.client(address, "client-0", job_file)
    assert deployment.wait(server) == 0, deployment.log(server)
    assert deployment.wait(client) == 0, deployment.log(client)
    weights, meta = codec.load_file(run / "global_model.safetensors")
    assert meta["round"] == 1 and weights["ballast"].numel() * 4 > 100_000_000
    torch.manual_seed(0)
    initial = Task().model().state_dict()
    assert torch.equal(weights["ballast"], initial["ballast"])  # there and back, intact
    assert not torch.equal(weights["layer.weight"], initial["layer.weight"])  # trained
    assert BALLAST * 4 > 100 * 1024 * 1024 - 1


def test_plaintext_needs_a_flag_and_warns(deployment: Deployment, tmp_path: Path) -> None:
    job_file = deployment.job(small_job(job={"rounds": 1, "clients": 1}))
    refused = deployment.flcore("server", str(job_file), "--listen", "127.0.0.1:0")
    assert refused.returncode == 1 and "--insecure" in refused.stderr
    server, address = deployment.server(job_file, tmp_path / "run", "--insecure")
    client = deployment.client(address, "client-0", job_file, "--insecure")
    assert deployment.wait(server) == 0, deployment.log(server)
    assert deployment.wait(client) == 0, deployment.log(client)
    for proc in (server, client):
        assert "WARNING: --insecure: plaintext" in deployment.log(proc)


def test_a_client_that_stalls_is_dropped_after_the_round_timeout(
    deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flcore.job import Job

    job = Job.from_dict(
        {
            "job": {
                "name": "stall",
                "task": "tests.deploy_stall_task",
                "rounds": 2,
                "clients": 3,
                "min_clients": 2,
                "heartbeat_interval": 2.0,
                "round_timeout": 20.0,
            },
            "local": {"batch_size": 8},
        }
    )
    run = tmp_path / "run"
    server, clients = serve_marking_one(
        deployment, job, run, monkeypatch, "FLCORE_TEST_STALL", 1
    )  # only client-1 stalls
    assert deployment.wait(server) == 0, deployment.log(server)
    lines = metrics(run)
    assert [m["round"] for m in lines] == [1, 2]
    assert lines[0]["clients"] == ["client-0", "client-2"]  # the round went on without it
    dropped = [e for e in events(run) if e["event"] == "client_dropped"]
    assert [e["client"] for e in dropped] == ["client-1"]
    assert "round_timeout" in dropped[0]["reason"]  # alive (it kept beating), but too slow
    assert names_of(run, "client_quit").count("client-1") == 1
    for client in (clients[0], clients[2]):
        assert deployment.wait(client) == 0


def test_too_few_clients_fail_the_round_and_keep_the_previous_model(
    deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = small_job(
        job={
            "task": CRASH_TASK,
            "rounds": 3,
            "min_clients": 3,
            "heartbeat_interval": 2.0,
            "round_timeout": 120,
            "keep_round_models": True,
        }
    )
    run = tmp_path / "run"
    server, _ = kill_client_2_after_round_1(deployment, job, run, monkeypatch)
    assert deployment.wait(server) != 0  # the run stops: a round cannot have 3 contributions
    log = deployment.log(server)
    assert "Round 2 failed" in log and "2 of 3 contributions accepted, 3 needed" in log
    assert [m["round"] for m in metrics(run)] == [1]
    kept = (run / "global_model.safetensors").read_bytes()
    last = run / "rounds" / "0001" / "global_model.safetensors"
    assert kept == last.read_bytes()
