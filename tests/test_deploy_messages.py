"""Bad messages from a client: a rogue client (this test, speaking the wire protocol
through gRPC with a valid certificate) sends malformed, oversized, truncated and late
messages; each is refused with a logged reason while the server serves the other client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from flcore.deploy import wire
from flcore.deploy.client import channel_credentials
from flcore.deploy.server import job_digest
from flcore.job import Job
from tests.conftest import small_job
from tests.deploy_support import Deployment, deployment_in, events, metrics, wait_for


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    with deployment_in(tmp_path) as dep:
        yield dep


def refused(call: object, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    assert info.value.code() == code  # type: ignore[attr-defined]
    return str(info.value.details())  # type: ignore[attr-defined]


def test_bad_messages_are_refused_and_the_others_are_served(
    deployment: Deployment, tmp_path: Path
) -> None:
    job = small_job(
        job={
            "rounds": 2,
            "clients": 2,
            "min_clients": 1,
            "heartbeat_interval": 2.0,
            "max_message_mb": 1,
        },
        local={"epochs": 30},  # the honest client's round 2 outlasts the rogue's rejoining
    )
    certs = deployment.certs(clients=("client-0", "client-1"))
    job_file = deployment.job(job)
    run = tmp_path / "run"
    server, address = deployment.server(job_file, run)
    honest = deployment.client(address, "client-0", job_file)

    creds = channel_credentials(
        (certs / "ca.pem").read_bytes(),
        (certs / "client-1" / "client-1.pem").read_bytes(),
        (certs / "client-1" / "client-1.key").read_bytes(),
    )
    with grpc.secure_channel(address, creds, options=wire.grpc_options()) as channel:
        join = channel.unary_unary(wire.JOIN)
        next_ = channel.unary_stream(wire.NEXT)
        reply = channel.stream_unary(wire.REPLY)
        assert "malformed join request" in refused(lambda: join(b"\xff{", timeout=60))
        digest = job_digest(Job.load(job_file))
        assert "claims to be 'client-0' but its certificate names 'client-1'" in refused(
            lambda: join(wire.pack({"name": "client-0", "job": digest}), timeout=60),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        beat = channel.unary_unary(wire.BEAT)
        assert "malformed heartbeat" in refused(lambda: beat(b"[]", timeout=60))
        assert "heartbeat: unknown session" in refused(
            lambda: beat(wire.pack({"session": "forged"}), timeout=60), grpc.StatusCode.NOT_FOUND
        )
        assert "malformed work request" in refused(lambda: list(next_(b"\x00", timeout=60)))
        session = wire.unpack(
            join(wire.pack({"name": "client-1", "job": digest}), timeout=60), "join"
        )["session"]
        header, payload = wire.receive(
            next_(wire.pack({"session": session}), timeout=120), 1 << 20, "task"
        )
        while header.get("idle"):
            header, payload = wire.receive(
                next_(wire.pack({"session": session}), timeout=120), 1 << 20, "task"
            )
        assert header["request"] == "train" and len(payload) > 0
        task = {"session": session, "task": header["task"]}

        def send(*messages: bytes) -> str:
            return refused(lambda: reply(iter(messages), timeout=60))

        assert "malformed reply header" in send(b"not json")
        assert "oversized reply: declares 1048577 bytes" in send(
            wire.pack({**task, "size": (1 << 20) + 1})
        )
        assert "truncated reply: 10 of the 1000 bytes" in send(
            wire.pack({**task, "size": 1000}), b"x" * 10
        )
        assert "oversized reply: more than the 10 bytes" in send(
            wire.pack({**task, "size": 10}), b"x" * 20
        )
        assert "reply: unknown session" in refused(
            lambda: reply(wire.stream({"session": "forged", "task": "t"}, b"x"), timeout=60),
            grpc.StatusCode.NOT_FOUND,
        )
        # well framed, but not a codec payload: the trainer refuses the contribution
        reply(wire.stream(task, b"\x00" * 64), timeout=60)
        assert "late reply from client-1" in send(*wire.stream(task, b"\x00" * 64))
        # the rogue goes silent: dropped after four missed beats ...
        wait_for(lambda: any(e["event"] == "client_dropped" for e in events(run)), "the drop")
        # ... and, joining again, it is registered again and given the next request
        session = wire.unpack(
            join(wire.pack({"name": "client-1", "job": digest}), timeout=60), "join"
        )["session"]
        header = {"idle": True}
        while header.get("idle"):
            header, payload = wire.receive(
                next_(wire.pack({"session": session}), timeout=120), 1 << 20, "task"
            )
        assert header.get("request") in {"train", "validate"}, header
        reply(wire.stream({"session": session, "task": header["task"], "error": "no"}), timeout=60)
        assert deployment.wait(server) == 0, deployment.log(server)
    assert deployment.wait(honest) == 0

    reasons = [e["reason"] for e in events(run) if e["event"] == "message_refused"]
    for expected in (
        "malformed reply header",
        "oversized reply: declares",
        "truncated reply",
        "oversized reply: more than",
        "late reply",
    ):
        assert any(expected in r for r in reasons), (expected, reasons)
    assert any(
        "malformed join request" in e["reason"]
        for e in events(run)
        if e["event"] == "client_refused"
    )
    line = metrics(run)[0]
    assert line["clients"] == ["client-0"]
    assert any("contribution from client-1: malformed" in r for r in line["refused"])
    assert next(e["client"] for e in events(run) if e["event"] == "client_dropped") == "client-1"
    registered = [e["client"] for e in events(run) if e["event"] == "client_register"]
    assert registered.count("client-1") == 2
    assert any(e["event"] == "client_rejoined" for e in events(run))
