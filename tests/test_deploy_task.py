"""`flcore client --task`: a client without the job file takes the job from the server and
trains the task it names itself (issue 7's "task options")."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from flcore.cli import main
from flcore.deploy.client import job_from_server
from flcore.deploy.server import job_digest, shared_digest
from flcore.errors import JobError
from flcore.run import run_job
from tests.conftest import small_job
from tests.deploy_support import deployment_in, events

NAMES = ("client-0", "client-1")


def test_clients_with_their_own_task_reach_the_embedded_runs_bytes(tmp_path: Path) -> None:
    job = small_job(job={"rounds": 2, "clients": 2, "heartbeat_interval": 2.0})
    with deployment_in(tmp_path) as deployment:
        deployment.certs(clients=NAMES)
        job_file = deployment.job(job)
        run = tmp_path / "run"
        server, address = deployment.server(job_file, run)
        task = ("--task", "examples.digits", "--task-set", "hidden=16")
        clients = [deployment.client(address, name, None, *task) for name in NAMES]
        assert deployment.wait(server) == 0, deployment.log(server)
        for client in clients:
            assert deployment.wait(client) == 0, deployment.log(client)
            assert "job_received" in deployment.log(client)
    embedded = run_job(job, out=tmp_path / "embedded")
    deployed = (run / "global_model.safetensors").read_bytes()
    assert deployed == embedded.global_model_path.read_bytes()
    assert sorted(e["client"] for e in events(run) if e["event"] == "job_sent") == list(NAMES)


def test_the_servers_task_is_replaced_never_used() -> None:
    server = small_job(job={"task": "evil.module:Payload"}, task={"hidden": 99, "cmd": "rm"})
    job = job_from_server(server.to_toml(), "examples.digits", ["hidden=16"])
    assert job.job.task == "examples.digits"
    assert dict(job.task_section) == {"hidden": 16}
    assert job.job.rounds == server.job.rounds and job.chain == server.chain
    # the server compares everything but the task: equal here, unlike the whole job
    assert shared_digest(job) == shared_digest(server)
    assert job_digest(job) != job_digest(server)
    assert shared_digest(small_job(job={"seed": 7})) != shared_digest(small_job())


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[job\nrounds = ", "not valid TOML"),
        ("__import__('os')", "not valid TOML"),
        ("[local]\nepochs = 1\n", "no [job] table"),
        ("job = 3\n", "no [job] table"),
        ('[job]\nrounds = "many"\n', "[job]"),
    ],
)
def test_a_malformed_job_from_the_server_is_a_clear_error(text: str, reason: str) -> None:
    with pytest.raises(JobError, match=re.escape(reason)):
        job_from_server(text, "examples.digits")


def test_bad_task_options_are_clear_errors() -> None:
    with pytest.raises(JobError, match="expected key=value"):
        job_from_server(small_job().to_toml(), "examples.digits", ["hidden"])
    base = ["client", "--server", "127.0.0.1:1", "--name", "client-0", "--insecure"]
    cases = {
        (): "give --job job.toml (the federation's job file) or --task",
        ("--job", "j.toml", "--task", "examples.digits"): "not both",
        ("--task-set", "hidden=3", "--job", "j.toml"): "not both",
        ("--task-set", "hidden=3"): "--task-set needs --task",
        ("--task", "examples.digits", "--set", "job.rounds=3"): "--set needs --job",
    }
    for args, message in cases.items():
        done = CliRunner().invoke(main, [*base, *args])
        assert done.exit_code == 1, done.output
        assert message in done.stderr, done.stderr
