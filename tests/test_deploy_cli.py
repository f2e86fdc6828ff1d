"""`flcore server`, `flcore client` and `flcore certs` refuse bad input with a clear error."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from flcore.cli import main
from tests.conftest import small_job
from tests.deploy_support import Deployment, deployment_in


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    with deployment_in(tmp_path) as dep:
        yield dep


def error(done: Any) -> str:
    assert done.exit_code == 1, done.output
    return str(done.stderr)


def flcore(*args: str) -> Any:
    """The command in this process: these errors come before any process would differ."""
    return CliRunner().invoke(main, list(args))


def test_bad_command_lines_are_refused(deployment: Deployment, tmp_path: Path) -> None:
    job = str(deployment.job(small_job(job={"clients": 1, "join_timeout": 1})))
    certs = str(deployment.certs(clients=("client-0",)))
    run = flcore
    assert "not both" in error(run("server", job, "--certs", certs, "--insecure"))
    assert "HOST:PORT" in error(run("server", job, "--listen", "nowhere", "--insecure"))
    assert "cannot read" in error(run("server", job, "--certs", str(tmp_path / "none")))
    assert "drop --out" in error(run("server", job, "--insecure", "--resume", "a", "--out", "b"))
    assert "no job.toml" in error(
        run("server", job, "--insecure", "--resume", str(tmp_path / "none"))
    )
    client = ["client", "--server", "127.0.0.1:1", "--job", job]
    assert "--certs DIR" in error(run(*client, "--name", "client-0"))
    assert "not both" in error(run(*client, "--name", "client-0", "--insecure", "--certs", certs))
    assert "invalid client name" in error(run(*client, "--name", "a b", "--certs", certs))
    assert "make it with `flcore certs" in error(
        run(*client, "--name", "client-7", "--certs", certs)
    )
    assert "not in the job's allowed clients" in error(
        run(*client, "--name", "client-7", "--insecure")
    )
    assert "stayed unreachable for 0.5 s" in error(
        run(*client, "--name", "client-0", "--insecure", "--give-up-after", "0.5")
    )
    assert "invalid client name" in error(run("certs", str(tmp_path / "c"), "--client", "ca"))
    # nobody joins within join_timeout: the server stops and says so
    assert "0 of 1 clients joined within [job] join_timeout" in error(
        run("server", job, "--listen", "127.0.0.1:0", "--insecure", "--out", str(tmp_path / "r"))
    )


def test_a_port_in_use_is_an_error(deployment: Deployment, tmp_path: Path) -> None:
    job = str(deployment.job(small_job(job={"clients": 1})))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = flcore(
            "server",
            job,
            "--listen",
            f"127.0.0.1:{port}",
            "--insecure",
            "--out",
            str(tmp_path / "r"),
        )
    assert "cannot listen on 127.0.0.1:" in error(done)


def test_a_client_with_another_job_is_refused(deployment: Deployment, tmp_path: Path) -> None:
    job = deployment.job(small_job(job={"clients": 1, "join_timeout": 60}))
    other = deployment.job(
        small_job(job={"clients": 1, "join_timeout": 60, "seed": 7}), "other.toml"
    )
    deployment.certs(clients=("client-0",))
    _, address = deployment.server(job, tmp_path / "run")
    client = deployment.client(address, "client-0", other)
    assert deployment.wait(client) == 1
    assert "job differs from the server's" in deployment.log(client)


def test_encrypted_keys_and_revocation_lists_are_checked_before_serving(
    tmp_path: Path,
) -> None:
    job = small_job(job={"clients": 1})
    job_file = tmp_path / "job.toml"
    job_file.write_text(job.to_toml())
    secret = tmp_path / "passphrase"
    secret.write_text("open sesame\n")
    folder = str(tmp_path / "certs")
    unlock = ("--passphrase-file", str(secret))
    made = flcore("certs", folder, "--host", "127.0.0.1", "--client", "client-0", *unlock)
    assert made.exit_code == 0, made.output
    assert "issued" in made.output and "client-0/ for client client-0" in made.output
    server = ["server", str(job_file), "--listen", "127.0.0.1:0", "--certs", folder]
    assert "server.key is encrypted: give its passphrase" in error(flcore(*server))
    client = ["client", "--server", "127.0.0.1:1", "--job", str(job_file), "--name", "client-0"]
    bundle = str(tmp_path / "certs" / "client-0")
    assert "client-0.key is encrypted" in error(flcore(*client, "--certs", bundle))
    wrong = tmp_path / "wrong"
    wrong.write_text("guess")
    assert "wrong passphrase" in error(
        flcore(*client, "--certs", bundle, "--passphrase-file", str(wrong))
    )
    assert "cannot revoke client-9" in error(
        flcore("certs", folder, "--revoke", "client-9", *unlock)
    )
    (tmp_path / "certs" / "server" / "crl.pem").write_text("garbage")
    assert "cannot read the revocation list" in error(flcore(*server, *unlock))
