"""The deployment under abuse (issue 17): idle streams, a declared size with no data, and a
revoked certificate, each against a real `flcore server` on 127.0.0.1 while honest
`flcore client` processes finish their run. Every refusal leaves an audit event."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from flcore.deploy import wire
from flcore.deploy.certs import read_identity
from flcore.deploy.client import channel_credentials
from flcore.deploy.guard import FIRST_MESSAGE_SECONDS, MAX_STREAMS_PER_CLIENT
from flcore.deploy.server import job_digest
from flcore.job import Job
from flcore.run import run_job
from tests.conftest import small_job
from tests.deploy_support import Deployment, deployment_in, events, metrics, rss_bytes, wait_for

NAMES = ("client-0", "client-1", "client-2")
#: Digits, but each client waits at a gate (a folder) inside its second request.
GATE_TASK = "tests.deploy_gate_task"
IDLE = 50


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    with deployment_in(tmp_path) as dep:
        yield dep


@pytest.fixture
def gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder the clients started from here wait at, until ``open`` is created in it."""
    folder = tmp_path / "gate"
    folder.mkdir()
    monkeypatch.setenv("FLCORE_TEST_GATE", str(folder))
    return folder


def waiting_at(gate: Path, count: int) -> None:
    wait_for(lambda: len(list(gate.glob("waiting-*"))) == count, f"{count} clients at the gate")


def channel(address: str, certs: Path, name: str) -> grpc.Channel:
    """A channel that speaks as ``name``, with its certificate from ``certs``."""
    creds = channel_credentials(*read_identity(certs, name))
    return grpc.secure_channel(address, creds, options=wire.grpc_options())


@contextlib.contextmanager
def idle_calls(address: str, certs: Path, name: str, count: int) -> Iterator[list[Any]]:
    """``count`` calls, spread over every method, that open a stream and never send."""
    release = threading.Event()

    def nothing() -> Iterator[bytes]:
        release.wait()
        yield from ()

    methods = [wire.JOIN, wire.BEAT, wire.REPLY, wire.NEXT, wire.JOB]
    with channel(address, certs, name) as chan:
        calls = []
        for i in range(count):
            method = methods[i % len(methods)]
            if method in (wire.NEXT, wire.JOB):
                calls.append(chan.stream_stream(method)(nothing()))
            else:
                calls.append(chan.stream_unary(method).future(nothing()))
        try:
            yield calls
        finally:
            release.set()


def ended(calls: list[Any], within: float) -> Counter[grpc.StatusCode]:
    """How each call ended; each must have ended, by the server's doing, within ``within``."""
    deadline = time.monotonic() + within
    codes: Counter[grpc.StatusCode] = Counter()
    for call in calls:
        error = call.exception(timeout=max(0.0, deadline - time.monotonic()))
        assert error is not None, "an idle call was answered"
        codes[error.code()] += 1
    return codes


def test_idle_streams_hold_no_thread_and_honest_clients_reach_the_same_bytes(
    deployment: Deployment, tmp_path: Path, gate: Path
) -> None:
    job = small_job(
        job={"task": GATE_TASK, "rounds": 2, "heartbeat_interval": 3.0}, task={"hidden": 8}
    )
    certs = deployment.certs(clients=(*NAMES, "intruder"))
    job_file = deployment.job(job)
    run = tmp_path / "run"
    server, address = deployment.server(job_file, run)
    clients = [deployment.client(address, name, job_file) for name in NAMES]
    waiting_at(gate, 3)  # the run is in the middle of a request
    # the certificate of an allowed client (stolen, say), and one the CA signed for a name
    # the job does not allow
    with (
        idle_calls(address, certs, "client-0", IDLE) as allowed,
        idle_calls(address, certs, "intruder", IDLE) as intruders,
    ):
        outsider = ended(intruders, within=10)
        insider = ended(allowed, within=FIRST_MESSAGE_SECONDS + 15)
    (gate / "open").touch()
    assert set(outsider) <= {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert set(insider) <= {grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert insider[grpc.StatusCode.CANCELLED] <= MAX_STREAMS_PER_CLIENT
    assert deployment.wait(server) == 0, deployment.log(server)
    for client in clients:
        assert deployment.wait(client) == 0, deployment.log(client)
    embedded = run_job(job, out=tmp_path / "embedded")
    assert (run / "global_model.safetensors").read_bytes() == (
        embedded.global_model_path.read_bytes()
    )
    assert [m["clients"] for m in metrics(run)] == [list(NAMES)] * 2  # nobody was dropped
    # the audit: one event per refused or cancelled call, naming the client and its address
    log = events(run)
    refused = [e for e in log if e["event"] == "client_refused"]
    assert len(refused) == outsider[grpc.StatusCode.PERMISSION_DENIED] > 0
    assert all(e["client"] == "intruder" and e["peer"].startswith("ipv4:") for e in refused)
    cancelled = [e for e in log if e["event"] == "stream_cancelled"]
    assert len(cancelled) == insider[grpc.StatusCode.CANCELLED] > 0
    assert all(e["client"] == "client-0" and e["peer"] for e in cancelled)
    assert "sent nothing within" in cancelled[0]["reason"]
    busy = [e for e in log if e["event"] == "rpc_refused"]
    assert len(busy) >= IDLE - MAX_STREAMS_PER_CLIENT
    assert all(e["client"] == "client-0" and e["peer"] for e in busy)


def test_a_declared_size_with_no_data_costs_the_server_no_memory(
    deployment: Deployment, tmp_path: Path
) -> None:
    job = small_job(
        job={"rounds": 1, "clients": 2, "min_clients": 1, "max_message_mb": 2048},
        task={"hidden": 8},
        trainer={"skip_model_tests": True},
    )
    certs = deployment.certs(clients=("client-0", "client-1"))
    job_file = deployment.job(job)
    run = tmp_path / "run"
    server, address = deployment.server(job_file, run)
    honest = deployment.client(address, "client-0", job_file)
    with channel(address, certs, "client-1") as chan:  # the rogue speaks the wire itself
        join = chan.unary_unary(wire.JOIN)
        hello = {"name": "client-1", "job": job_digest(Job.load(job_file))}
        session = wire.unpack(join(wire.pack(hello), timeout=60), "join")["session"]
        header: dict[str, Any] = {"idle": True}
        while header.get("idle"):
            header, _ = wire.receive(
                chan.unary_stream(wire.NEXT)(wire.pack({"session": session}), timeout=120),
                1 << 30,
                "request",
            )
        task = {"session": session, "task": header["task"]}
        declared = 2048 * 1024 * 1024  # the job's max_message_mb: the largest a reply may be
        release = threading.Event()

        def header_only() -> Iterator[bytes]:
            yield wire.pack({**task, "size": declared})
            release.wait()

        before = rss_bytes(server.pid)
        replies = [chan.stream_unary(wire.REPLY).future(header_only()) for _ in range(2)]
        grown = 0
        for _ in range(20):  # a second and a half of the server holding both streams
            time.sleep(0.075)
            grown = max(grown, rss_bytes(server.pid) - before)
        release.set()
        for reply in replies:
            assert "truncated reply: 0 of the 2147483648 bytes" in reply.exception(60).details()
        chan.stream_unary(wire.REPLY)(wire.stream({**task, "error": "gave up"}), timeout=60)
    assert grown < 256 * 1024 * 1024, f"the server grew by {grown / 2**20:.0f} MiB"
    assert deployment.wait(server) == 0, deployment.log(server)
    assert deployment.wait(honest) == 0
    log = events(run)
    truncated = [e for e in log if e["event"] == "message_refused"]
    assert len(truncated) == 2
    assert all(e["client"] == "client-1" and e["peer"].startswith("ipv4:") for e in truncated)
    refused = [e for e in log if e["event"] == "contribution_refused"]
    assert [(e["client"], "gave up" in e["reason"]) for e in refused] == [("client-1", True)]
    assert refused[0]["peer"].startswith("ipv4:127.0.0.1:")  # the trainer's event, audited
    assert metrics(run)[0]["clients"] == ["client-0"]


def test_a_client_revoked_on_sighup_is_refused_before_any_hook(
    deployment: Deployment, tmp_path: Path, gate: Path
) -> None:
    job = small_job(
        job={
            "task": GATE_TASK,
            "rounds": 2,
            "clients": 2,
            "min_clients": 1,
            "heartbeat_interval": 1.0,
        },
        task={"hidden": 8},
    )
    secret = tmp_path / "passphrase"
    secret.write_text("not in the folder\n")
    unlock = ("--passphrase-file", str(secret))
    certs = deployment.certs("certs", ("client-0", "client-1"), *unlock)
    assert b"ENCRYPTED" in (certs / "client-1" / "client-1.key").read_bytes()
    job_file = deployment.job(job)
    run = tmp_path / "run"
    # each side gets only its bundle: the CA's key stays in certs/ca/
    server, address = deployment.server(job_file, run, *unlock, certs="certs/server")
    clients = [
        deployment.client(address, name, job_file, *unlock, certs=f"certs/{name}")
        for name in ("client-0", "client-1")
    ]
    waiting_at(gate, 2)
    done = deployment.flcore("certs", str(certs), "--revoke", "client-1", *unlock)
    assert done.returncode == 0 and "send the server SIGHUP" in done.stdout, done.stderr
    server.send_signal(signal.SIGHUP)
    revoked = wait_for(
        lambda: [e for e in events(run) if e["event"] == "client_revoked"], "the revocation"
    )
    assert revoked[0]["client"] == "client-1" and revoked[0]["peer"].startswith("ipv4:")
    (gate / "open").touch()
    assert deployment.wait(server) == 0, deployment.log(server)
    assert deployment.wait(clients[0]) == 0, deployment.log(clients[0])
    assert deployment.wait(clients[1]) == 1
    assert "the certificate of 'client-1' is revoked" in deployment.log(clients[1])
    log = events(run)
    reloaded = [e["revoked"] for e in log if e["event"] == "revocations_loaded"]
    assert reloaded == [0, 1]  # read at the start, and again on SIGHUP
    after = log[log.index(next(e for e in log if e["event"] == "client_revoked")) :]
    assert not [e for e in after if e["event"] in {"client_joined", "client_register"}]
    assert metrics(run)[-1]["clients"] == ["client-0"]
