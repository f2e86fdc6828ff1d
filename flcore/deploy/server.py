"""The server side of a deployment: a gRPC service that remote clients join, and the
:class:`NetworkRuntime` through which the ordinary trainer sends them work.

Clients pull: a client joins (``Join``), then asks for work (``Next``, a long poll that
answers a request or "idle"), uploads its reply (``Reply``) and beats (``Beat``) every
``[job] heartbeat_interval`` seconds. The trainer's thread is the only one that fires
hooks; gRPC's threads only move bytes and update the members' state under one lock.

Every call first passes the :class:`flcore.deploy.guard.Guard` (allowed, unrevoked peers
only; a bounded number of calls each; no call waiting on its peer past a deadline).
"""

from __future__ import annotations

import hashlib
import json
import queue
import signal
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import grpc

from flcore.codec import Payload, write_atomic
from flcore.context import ServerContext
from flcore.deploy import wire
from flcore.deploy.certs import Revocations
from flcore.deploy.guard import MAX_STREAMS_PER_CLIENT, SPARE_THREADS, Guard, not_allowed, tls_name
from flcore.errors import FLCoreError
from flcore.runtime.base import ClientResult, Runtime

#: A client silent for this many heartbeat intervals is dropped.
MISSED_BEATS = 4
#: How long a ``Next`` long poll waits before answering "idle".
POLL_SECONDS = 2.0
#: What ``flcore server`` writes to the run directory once it listens.
ADDRESS_FILE = "server.json"


def allowed_clients(job: Any) -> list[str]:
    """The names that may join, in data order: the job's client names
    (:attr:`flcore.job.Job.client_names`), the same as a simulation's."""
    return list(job.client_names)


def job_digest(job: Any) -> str:
    """What client and server compare: the same resolved job, or no federation."""
    return hashlib.sha256(job.to_toml().encode()).hexdigest()


def shared_digest(job: Any) -> str:
    """What a client that names its own task (``flcore client --task``) and the server
    compare: the resolved job without ``[job] task`` and the ``[task]`` section."""
    from flcore.job import dump_toml

    data = {k: v for k, v in job.raw.items() if k != "task"}
    data["job"] = {k: v for k, v in data.get("job", {}).items() if k != "task"}
    return hashlib.sha256(dump_toml(data).encode()).hexdigest()


@attrs.define(eq=False)
class Task:
    """One request to one client; the reply goes to ``results`` as ``(name, id, reply, error)``."""

    request: str
    payload: Payload = attrs.field(repr=False)
    results: queue.Queue[tuple[str, str, Any, str | None]] = attrs.field(repr=False)
    id: str = attrs.field(factory=lambda: uuid.uuid4().hex)


@attrs.define(eq=False)
class Member:
    """A client the job allows, and its connection's state."""

    name: str
    session: str | None = None
    last_seen: float = 0.0
    #: Work waiting for the client's next ``Next``, and the request it is working on.
    inbox: queue.Queue[Task | None] = attrs.field(factory=queue.Queue)
    current: Task | None = None
    #: Registered with the chain (``client_register`` fired, ``client_quit`` not yet).
    registered: bool = False
    #: The gRPC peer (``ipv4:HOST:PORT``) of its last join, for the audit of its events.
    address: str | None = None


class Federation:
    """The gRPC service's state: who may join, who is connected, what each is working on."""

    def __init__(
        self,
        job: Any,
        log: Any,
        identity_from_tls: bool,
        revocations: Revocations | None = None,
    ) -> None:
        self.job = job
        self.log = log
        self.identity_from_tls = identity_from_tls
        self.digest = job_digest(job)
        self.shared = shared_digest(job)
        self.job_text = job.to_toml().encode()
        self.max_size = job.job.max_message_mb * 1024 * 1024
        self.members = {name: Member(name) for name in allowed_clients(job)}
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.stopping = False
        self.guard = Guard(self, revocations)

    # -- gRPC handlers (gRPC's threads) ---------------------------------------------

    def refuse(self, context: Any, code: Any, event: str, reason: str, **fields: Any) -> None:
        """Abort the call with ``reason``, leaving one audit event that names the peer's
        address, and its client and method where known."""
        stream = self.guard.stream(context)
        if stream is not None:
            fields.setdefault("method", stream.method)
            if stream.name is not None:
                fields.setdefault("client", stream.name)
        self.log.warning(event, reason=reason, peer=context.peer(), **fields)
        context.abort(code, reason)

    def identify(self, hello: dict[str, Any], context: Any) -> str:
        """The allowed name of the client behind ``hello``, or refuse it."""
        claimed = hello.get("name")
        name = tls_name(context) if self.identity_from_tls else claimed
        if not isinstance(name, str) or name not in self.members:
            self.refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "client_refused",
                not_allowed(name, self.members),
                client=name,
            )
        if claimed is not None and claimed != name:
            self.refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "client_refused",
                f"claims to be {claimed!r} but its certificate names {name!r}",
                client=name,
            )
        assert isinstance(name, str)
        self.guard.claim(context, name)
        return name

    def unpack(self, request: bytes, context: Any, what: str, event: str) -> dict[str, Any]:
        try:
            return wire.unpack(request, what)
        except wire.WireError as err:
            self.refuse(context, grpc.StatusCode.INVALID_ARGUMENT, event, str(err))
            raise AssertionError from None  # abort raised

    def send_job(self, request: bytes, context: Any) -> Iterator[bytes]:
        """The resolved job's TOML text, for an allowed client started without ``--job``
        (it replaces the task with its own; the text is data, parsed with tomllib)."""
        name = self.identify(
            self.unpack(request, context, "job request", "client_refused"), context
        )
        self.log.info("job_sent", client=name, peer=context.peer())
        yield from wire.stream({}, self.job_text)

    def join(self, request: bytes, context: Any) -> bytes:
        hello = self.unpack(request, context, "join request", "client_refused")
        name = self.identify(hello, context)
        own_task = hello.get("own_task") is True
        if hello.get("job") != (self.shared if own_task else self.digest):
            self.refuse(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "client_refused",
                "the client's job differs from the server's "
                + (
                    "(outside the task it names itself)"
                    if own_task
                    else "(same job file and --set overrides on both sides)"
                ),
                client=name,
            )
        with self.lock:
            member = self.members[name]
            if member.current is not None:  # it lost its work by reconnecting
                task, member.current = member.current, None
                task.results.put((name, task.id, None, "reconnected in the middle of a request"))
            member.inbox = queue.Queue()
            member.session = uuid.uuid4().hex
            member.last_seen = time.monotonic()
            member.address = context.peer()
            session = member.session
            self.changed.notify_all()
        self.log.info("client_joined", client=name, peer=context.peer())
        return wire.pack({"session": session, "heartbeat": self.job.job.heartbeat_interval})

    def member(self, session: Any, context: Any, what: str) -> Member:
        found = None
        with self.lock:
            for member in self.members.values():
                if session is not None and member.session == session:
                    if not self.identity_from_tls or tls_name(context) == member.name:
                        member.last_seen = time.monotonic()
                        found = member
                    break
        if found is None:
            self.refuse(
                context, grpc.StatusCode.NOT_FOUND, "message_refused", f"{what}: unknown session"
            )
            raise AssertionError  # abort raised
        self.guard.claim(context, found.name)
        return found

    def beat(self, request: bytes, context: Any) -> bytes:
        session = self.unpack(request, context, "heartbeat", "message_refused").get("session")
        self.member(session, context, "heartbeat")
        return b"{}"

    def next(self, request: bytes, context: Any) -> Iterator[bytes]:
        session = self.unpack(request, context, "work request", "message_refused").get("session")
        member = self.member(session, context, "work request")
        if self.stopping:
            yield wire.pack({"stop": True, "size": 0})
            return
        try:
            task = member.inbox.get(timeout=POLL_SECONDS)
        except queue.Empty:
            yield wire.pack({"idle": True, "size": 0})
            return
        if task is None:
            yield wire.pack({"stop": True, "size": 0})
            return
        with self.lock:
            if member.session != session:  # replaced by a newer connection meanwhile
                task.results.put((member.name, task.id, None, "reconnected before its request"))
                return
            member.current = task
        yield from wire.stream({"task": task.id, "request": task.request}, task.payload)

    def reply(self, messages: Iterable[bytes], context: Any) -> bytes:
        found: list[Member] = []

        def check(header: dict[str, Any]) -> None:
            member = self.member(header.get("session"), context, "reply")
            found.append(member)
            if member.current is None or member.current.id != header.get("task"):
                raise wire.WireError(
                    f"late reply from {member.name}: its request {header.get('task')!r} "
                    "is closed (the round moved on without it)"
                )

        try:
            header, payload = wire.receive(messages, self.max_size, "reply", on_header=check)
        except wire.WireError as err:
            fields = {"client": found[0].name} if found else {}
            self.refuse(
                context, grpc.StatusCode.INVALID_ARGUMENT, "message_refused", str(err), **fields
            )
        member = found[0]
        error = header.get("error")
        with self.lock:
            task = member.current
            if task is None or task.id != header.get("task"):
                self.refuse(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "message_refused",
                    f"late reply from {member.name}: its request is closed",
                    client=member.name,
                )
            assert task is not None
            member.current = None
            member.last_seen = time.monotonic()
        task.results.put(
            (member.name, task.id, None if error else payload, str(error) if error else None)
        )
        return b"{}"

    def handler(self) -> Any:
        """Every method takes a stream of requests, even those a client calls with one, so
        that the guard runs before any message is read (gRPC reads a unary call's request
        before its handler runs, holding a thread for as long as the peer sends nothing)."""
        guard = self.guard

        def one_answer(method: str, answer: Any) -> Any:
            def handle(requests: Iterator[bytes], context: Any) -> bytes:
                with guard.call(context, method):
                    return answer(guard.first(context, requests, method), context)

            return grpc.stream_unary_rpc_method_handler(handle)

        def streamed(method: str, answer: Any) -> Any:
            def handle(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
                with guard.call(context, method):
                    request = guard.first(context, requests, method)
                    yield from guard.write(context, answer(request, context))

            return grpc.stream_stream_rpc_method_handler(handle)

        def reply(requests: Iterator[bytes], context: Any) -> bytes:
            with guard.call(context, "Reply"):
                return self.reply(guard.read(context, requests), context)

        return grpc.method_handlers_generic_handler(
            wire.SERVICE,
            {
                "Join": one_answer("Join", self.join),
                "Job": streamed("Job", self.send_job),
                "Beat": one_answer("Beat", self.beat),
                "Next": streamed("Next", self.next),
                "Reply": grpc.stream_unary_rpc_method_handler(reply),
            },
        )


def audited(log: Any, members: Mapping[str, Member]) -> Any:
    """``log``, adding the address of the client an event names: the trainer logs refused
    contributions and drops by the client's name only, and the audit wants where from."""
    import structlog

    def add_peer(_logger: Any, _method: str, event: Any) -> Any:
        member = members.get(event.get("client")) if isinstance(event.get("client"), str) else None
        if member is not None and member.address is not None:
            event.setdefault("peer", member.address)
        return event

    return structlog.wrap_logger(
        log,
        processors=[add_peer],
        wrapper_class=structlog.BoundLogger,
        context_class=dict,
        cache_logger_on_first_use=False,
    ).bind()


def server_credentials(ca: bytes, cert: bytes, key: bytes) -> Any:
    """Mutual TLS: the server's certificate, and only clients whose certificate chains to
    the federation's CA pass the handshake."""
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


class NetworkRuntime(Runtime):
    """Clients in other processes, reached over gRPC. ``credentials`` None: plaintext.
    ``revocations``: the CA's list of revoked client certificates, reread on SIGHUP."""

    def __init__(
        self,
        job: Any,
        listen: str,
        credentials: Any,
        log: Any,
        revocations: Revocations | None = None,
    ) -> None:
        self.job = job
        self.listen = listen
        self.credentials = credentials
        self.federation = Federation(
            job, log, identity_from_tls=credentials is not None, revocations=revocations
        )
        self.server: Any = None
        self.address: str | None = None
        self.plain_log: Any = None
        self.sighup: Any = None

    # -- the runtime seam (the trainer's thread) ----------------------------------

    def start(self, ctx: ServerContext) -> list[str]:
        from concurrent import futures

        fed = self.federation
        self.plain_log = ctx.log
        ctx.log = fed.log = audited(ctx.log, fed.members)
        members = len(fed.members)
        threads = MAX_STREAMS_PER_CLIENT * members + SPARE_THREADS
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="flcore-rpc"),
            options=wire.grpc_options(),
            maximum_concurrent_rpcs=threads,  # a call beyond is refused, never queued
        )
        self.server.add_generic_rpc_handlers((fed.handler(),))
        try:
            if self.credentials is None:
                port = self.server.add_insecure_port(self.listen)
            else:
                port = self.server.add_secure_port(self.listen, self.credentials)
        except RuntimeError as err:
            raise FLCoreError(f"cannot listen on {self.listen}: {err}") from err
        if port == 0:
            raise FLCoreError(f"cannot listen on {self.listen} (in use, or not an address)")
        self.server.start()
        self.watch_revocations(ctx)
        fed.guard.start()
        host = self.listen.rsplit(":", 1)[0]
        self.address = f"{host}:{port}"
        ctx.log.info("server_listening", address=self.address, tls=self.credentials is not None)
        if ctx.run_dir is not None:
            write_atomic(ctx.run_dir / ADDRESS_FILE, json.dumps({"address": self.address}).encode())
        needed = self.job.job.required_clients()
        deadline = time.monotonic() + self.job.job.join_timeout
        with fed.lock:
            while True:
                joined = [m.name for m in fed.members.values() if m.session is not None]
                left = deadline - time.monotonic()
                if len(joined) == members or left <= 0:
                    break
                fed.changed.wait(min(left, 1.0))
            if len(joined) < needed:
                raise FLCoreError(
                    f"{len(joined)} of {members} clients joined within [job] join_timeout "
                    f"({self.job.job.join_timeout:g} s), {needed} needed: {joined}"
                )
            for name in joined:
                fed.members[name].registered = True
        ctx.log.info("federation_ready", clients=joined)
        return joined

    def run(
        self, ctx: ServerContext, request: str, payload: Payload, clients: Sequence[str]
    ) -> Iterator[ClientResult]:
        fed = self.federation
        self.register_returning(ctx, clients)
        results: queue.Queue[tuple[str, str, Any, str | None]] = queue.Queue()
        outstanding: dict[str, Task] = {}
        with fed.lock:
            for name in clients:
                member = fed.members[name]
                if member.registered and member.session is not None:
                    task = Task(request, payload, results)
                    outstanding[name] = task
                    member.inbox.put(task)
        for name in clients:
            if name not in outstanding:
                yield ClientResult(name, error="not connected")
        del payload
        interval = self.job.job.heartbeat_interval
        deadline = time.monotonic() + self.job.job.round_timeout
        while outstanding:
            try:
                name, task_id, reply, error = results.get(timeout=min(interval, 0.5))
            except queue.Empty:
                pass
            else:
                if name in outstanding and outstanding[name].id == task_id:
                    del outstanding[name]
                    yield ClientResult(name, payload=reply, error=error)
                    reply = None
                continue
            now = time.monotonic()
            for name in list(outstanding):
                member = fed.members[name]
                if now > deadline:
                    reason = (
                        f"no reply within [job] round_timeout ({self.job.job.round_timeout:g} s)"
                    )
                elif now - member.last_seen > MISSED_BEATS * interval:
                    reason = f"no heartbeat for {now - member.last_seen:.1f} s"
                else:
                    continue
                del outstanding[name]
                self.drop(ctx, name, reason)
                yield ClientResult(name, error=f"dropped: {reason}")

    def watch_revocations(self, ctx: ServerContext) -> None:
        """Log the revocation list read at start; SIGHUP asks the watchdog to reread it."""
        guard = self.federation.guard
        if guard.revocations is None:
            return
        ctx.log.info(
            "revocations_loaded",
            path=str(guard.revocations.path),
            revoked=len(guard.revocations.serials),
        )
        if threading.current_thread() is threading.main_thread():
            self.sighup = signal.signal(signal.SIGHUP, lambda *_: guard.reload.set())

    def drop(self, ctx: ServerContext, name: str, reason: str) -> None:
        """A client died or stalled: forget its connection, fire ``client_quit``."""
        fed = self.federation
        with fed.lock:
            member = fed.members[name]
            member.session, member.current, member.registered = None, None, False
            member.inbox = queue.Queue()
        ctx.log.warning("client_dropped", client=name, reason=reason)
        ctx.fire("client_quit", client_id=name)

    def register_returning(self, ctx: ServerContext, clients: Sequence[str]) -> None:
        """Clients that came back after being dropped join the next request."""
        fed = self.federation
        with fed.lock:
            back = [
                n
                for n in clients
                if fed.members[n].session is not None and not fed.members[n].registered
            ]
            for name in back:
                fed.members[name].registered = True
        for name in back:
            ctx.log.info("client_rejoined", client=name)
            ctx.fire("client_register", client_id=name)

    def present(self, clients: Sequence[str]) -> list[str]:
        fed = self.federation
        return [n for n in clients if fed.members[n].registered]

    def stop(self, ctx: ServerContext) -> None:
        fed = self.federation
        with fed.lock:
            fed.stopping = True
            connected = [m for m in fed.members.values() if m.session is not None]
            for member in connected:
                member.inbox.put(None)
        if self.server is None:
            return
        # Give connected clients one poll to hear "stop", then close.
        deadline = time.monotonic() + POLL_SECONDS + 2 * self.job.job.heartbeat_interval
        while time.monotonic() < deadline and any(not m.inbox.empty() for m in connected):
            time.sleep(0.05)
        self.server.stop(grace=1.0).wait()
        self.server = None
        fed.guard.stop()
        if self.sighup is not None:
            signal.signal(signal.SIGHUP, self.sighup)
            self.sighup = None
        if self.plain_log is not None:
            ctx.log, self.plain_log = self.plain_log, None


def read_address(run_dir: Path) -> str:
    """The address a server of ``run_dir`` listens on (written once it listens)."""
    return str(json.loads((run_dir / ADDRESS_FILE).read_text())["address"])
