"""The client side of a deployment: join the server, pull requests, answer them with the
ordinary :class:`flcore.client.Client`, beat while working, and come back with backoff
when the server goes away (a restarted server is rejoined by itself)."""

from __future__ import annotations

import contextlib
import threading
import time
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from flcore.deploy import wire
from flcore.deploy.server import allowed_clients, job_digest, shared_digest
from flcore.errors import FLCoreError, JobError

T = TypeVar("T")
#: Largest job text a client accepts from the server.
MAX_JOB_TEXT = 16 * 1024 * 1024

#: gRPC codes after which a client tries again: the server is down, restarting or forgot us.
RETRY = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


#: How long a client keeps trying a call that the server refused as one too many
#: (RESOURCE_EXHAUSTED) before it counts the connection as lost.
BUSY_PATIENCE = 60.0


def patient(call: Callable[[], T], patience: float = BUSY_PATIENCE) -> T:
    """``call()``, tried again while the server says it is busy. It refuses such a call
    before reading it (another holder of this client's name, or a flood, fills its slots),
    so trying again is safe and keeps the session and the request it is working on."""
    backoff, deadline = 0.05, time.monotonic() + patience
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            busy = getattr(err, "code", lambda: None)() == grpc.StatusCode.RESOURCE_EXHAUSTED
            if not busy or time.monotonic() + backoff > deadline:
                raise
        time.sleep(backoff)
        backoff = min(2 * backoff, 1.0)


class ClientRefused(FLCoreError):
    """The server refused this client for good (not allowed, wrong job, bad certificate)."""


def channel_credentials(ca: bytes, cert: bytes, key: bytes) -> Any:
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


class Connection:
    """One client's link to the server: join, beat, next, reply."""

    def __init__(
        self, target: str, credentials: Any, name: str, digest: str, own_task: bool = False
    ) -> None:
        self.name = name
        self.target = target
        self.digest = digest
        #: The client names its own task: the server compares the job without it.
        self.own_task = own_task
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=wire.grpc_options())
        else:
            self.channel = grpc.secure_channel(target, credentials, options=wire.grpc_options())
        self.join_rpc = self.channel.unary_unary(wire.JOIN)
        self.job_rpc = self.channel.unary_stream(wire.JOB)
        self.beat_rpc = self.channel.unary_unary(wire.BEAT)
        self.next_rpc = self.channel.unary_stream(wire.NEXT)
        self.reply_rpc = self.channel.stream_unary(wire.REPLY)
        self.session: str | None = None

    def fetch_job(self, timeout: float) -> str:
        """The server's resolved job, as TOML text (data only: never imported or run)."""
        _, text = wire.receive(
            self.job_rpc(wire.pack({"name": self.name}), timeout=timeout),
            MAX_JOB_TEXT,
            "job from the server",
        )
        try:
            return bytes(text).decode("utf-8")
        except UnicodeDecodeError as err:
            raise JobError(f"malformed job from the server: not UTF-8 ({err})") from None

    def join(self, timeout: float) -> dict[str, Any]:
        hello: dict[str, Any] = {"name": self.name, "job": self.digest}
        if self.own_task:
            hello["own_task"] = True
        answer = wire.unpack(self.join_rpc(wire.pack(hello), timeout=timeout), "join answer")
        self.session = answer["session"]
        return answer

    def beat(self, timeout: float) -> None:
        message = wire.pack({"session": self.session})
        patient(lambda: self.beat_rpc(message, timeout=timeout), patience=timeout)

    def next(self, max_size: int) -> tuple[dict[str, Any], bytearray]:
        message = wire.pack({"session": self.session})
        return patient(
            lambda: wire.receive(
                self.next_rpc(message, timeout=wire_timeout(max_size)),
                max_size,
                "request from the server",
            )
        )

    def reply(self, task: str, payload: bytes | bytearray | None, error: str | None) -> None:
        header: dict[str, Any] = {"session": self.session, "task": task}
        if error is not None:
            header["error"] = error
        timeout = wire_timeout(len(payload or b""))
        patient(lambda: self.reply_rpc(wire.stream(header, payload), timeout=timeout))

    def close(self) -> None:
        self.channel.close()


def wire_timeout(size: int) -> float:
    """A generous deadline for moving ``size`` bytes (at least 1 MB/s, plus a minute)."""
    return 60.0 + size / 1e6


class Heartbeat(threading.Thread):
    """Beats every interval while the client lives, whatever it is busy with."""

    def __init__(self, conn: Connection, interval: float) -> None:
        super().__init__(daemon=True, name="flcore-heartbeat")
        self.conn = conn
        self.interval = interval
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            with contextlib.suppress(grpc.RpcError):  # the main loop notices and rejoins
                self.conn.beat(timeout=max(self.interval, 1.0))


def refusal(err: grpc.RpcError) -> ClientRefused | None:
    code = err.code() if hasattr(err, "code") else None
    if code in RETRY:
        return None
    return ClientRefused(f"the server refused this client: {err.details()}")


def job_from_server(
    text: str, task: str, task_settings: Iterable[str] = (), source: str = "the server's job"
) -> Any:
    """The job a client without ``--job`` runs: the server's resolved job ``text`` (TOML,
    parsed as data), with ``[job] task`` and ``[task]`` replaced by this client's own choice
    (``task`` and ``key=value`` settings), so the server never picks what the client imports."""
    from flcore.job import Job, apply_override, loads_toml

    try:
        data = loads_toml(text, "the job from the server")
    except tomllib.TOMLDecodeError as err:
        raise JobError(f"malformed job from the server: not valid TOML: {err}") from None
    if not isinstance(data.get("job"), dict):
        raise JobError("malformed job from the server: it has no [job] table")
    if not task or not isinstance(task, str):
        raise JobError("--task: give the task's import path, MODULE[:OBJECT]")
    data.pop("task", None)
    data["job"]["task"] = task
    data["task"] = {}
    for setting in task_settings:
        if "=" not in setting:
            raise JobError(f"--task-set {setting!r}: expected key=value")
        apply_override(data, f"task.{setting}", "--task-set")
    return Job.from_dict(data, source=source)


def _retrying(
    call: Callable[[], T], target: str, log: Any, give_up_after: float, max_backoff: float
) -> T:
    """``call()``, tried again with backoff while the server is unreachable."""
    backoff, unreachable_since = 0.2, None
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            refused = refusal(err)
            if refused is not None:
                raise refused from None
            now = time.monotonic()
            unreachable_since = unreachable_since or now
            if now - unreachable_since > give_up_after:
                raise FLCoreError(
                    f"the server at {target} stayed unreachable for {give_up_after:g} s "
                    f"(or refused this client's certificate at the TLS handshake): {err.details()}"
                ) from None
            log.info("server_unreachable", retry_in=backoff, reason=err.details())
            time.sleep(backoff)
            backoff = min(backoff * 2, max_backoff)


def serve(
    job: Any,
    name: str,
    target: str,
    credentials: Any,
    log: Any,
    give_up_after: float = 600.0,
    max_backoff: float = 5.0,
    task: str | None = None,
    task_settings: Iterable[str] = (),
    state_dir: Path | None = None,
) -> None:
    """Be client ``name`` of the job's federation at ``target`` until the server says stop.

    ``state_dir`` is where this client keeps its per-client state (``ctx.state``), one
    folder per server run, so a resumed run continues with it; ``None`` keeps it in memory.

    ``job`` None: take the job from the server and train ``task`` (this client's own
    choice, with ``task_settings``) in it; the server then checks that everything but the
    task agrees. Raises :class:`ClientRefused` when the server refuses this client, and
    :class:`FLCoreError` when the server stays unreachable for ``give_up_after`` seconds.
    """
    if job is None:
        if task is None:
            raise FLCoreError("give the job (--job job.toml) or this client's task (--task)")
        link = Connection(target, credentials, name, "")
        try:
            text = _retrying(
                lambda: link.fetch_job(timeout=60.0), target, log, give_up_after, max_backoff
            )
        finally:
            link.close()
        job = job_from_server(text, task, task_settings, source=f"the job of {target}")
        log.info("job_received", task=task)
    names = allowed_clients(job)
    if name not in names:
        raise ClientRefused(f"client {name!r} is not in the job's allowed clients {names}")
    import torch

    from flcore.chain import Chain
    from flcore.client import Client
    from flcore.task import load_task

    torch.set_num_threads(job.job.threads)
    chain = Chain.for_job(job)
    client = Client(
        job, load_task(job), chain, names.index(name), log, name=name, state_root=state_dir
    )
    max_size = job.job.max_message_mb * 1024 * 1024
    own_task = task is not None
    digest = shared_digest(job) if own_task else job_digest(job)
    conn = Connection(target, credentials, name, digest, own_task=own_task)
    try:
        _loop(conn, client, job, log, max_size, give_up_after, max_backoff)
    finally:
        conn.close()


def _loop(
    conn: Connection,
    client: Any,
    job: Any,
    log: Any,
    max_size: int,
    give_up_after: float,
    max_backoff: float,
) -> None:
    interval = job.job.heartbeat_interval
    while True:
        # each (re)join starts its backoff afresh
        _retrying(
            lambda: conn.join(timeout=max(10.0, 2 * interval)),
            conn.target,
            log,
            give_up_after,
            max_backoff,
        )
        log.info("joined", client=client.name)
        beat = Heartbeat(conn, interval)
        beat.start()
        try:
            if _work(conn, client, log, max_size):
                return
        except grpc.RpcError as err:
            refused = refusal(err)
            if refused is not None:
                raise refused from None
            log.info("connection_lost", reason=err.details())
        finally:
            beat.done.set()


def _work(conn: Connection, client: Any, log: Any, max_size: int) -> bool:
    """Answer requests until the server says stop (True) or the connection fails (raises)."""
    while True:
        header, payload = conn.next(max_size)
        if header.get("stop"):
            log.info("server_says_stop")
            return True
        if header.get("idle"):
            continue
        task, request = header.get("task"), header.get("request")
        if not isinstance(task, str) or not isinstance(request, str):
            raise wire.WireError("malformed request from the server: no task or request")
        log.info("request", request=request)
        try:
            reply, error = client.handle(request, payload), None
        except Exception as err:  # the user's code may fail in any way: the server hears why
            reply, error = None, f"{type(err).__name__}: {err}"
            log.warning("request_failed", request=request, error=error)
        del payload
        conn.reply(task, reply, error)
