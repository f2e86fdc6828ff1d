"""The gate every call of a deployed server passes first (:class:`Guard`).

The peer's certificate must name an allowed, unrevoked client before any handler reads a
byte; one client holds at most :data:`MAX_STREAMS_PER_CLIENT` calls; and a watchdog
cancels a call that waits on its peer past a deadline, so neither an idle nor a slow
stream can hold one of gRPC's few threads.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import attrs
import grpc

from flcore.deploy.certs import CertError, Revocations

if TYPE_CHECKING:
    from flcore.deploy.server import Federation

#: Calls one client may have open at once. It needs two (its heartbeat and its work); more
#: are refused at once, so that no name, allowed or stolen, can hold the server's threads.
MAX_STREAMS_PER_CLIENT = 4
#: Threads beyond MAX_STREAMS_PER_CLIENT per client: room for the calls being refused.
SPARE_THREADS = 16
#: A call's first message is a small header that a client sends as it opens the call.
FIRST_MESSAGE_SECONDS = 5.0
#: After it, a call that moves no message either way for this long is cancelled: a 1 MiB
#: chunk in 30 s is a link too slow for a federation anyway.
STALL_SECONDS = 30.0
#: How often the watchdog looks for stuck calls (and a SIGHUP's request to reread the CRL).
WATCH_SECONDS = 0.25


def tls_name(context: Any) -> str | None:
    """The common name of the peer's certificate (None without TLS)."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode(errors="replace") if names else None


def not_allowed(name: object, members: Iterable[str]) -> str:
    return f"client {name!r} is not allowed by the job ([job] allowed_clients: {sorted(members)})"


@attrs.define(eq=False)
class Stream:
    """One call in progress: who makes it (once known), from where, and since when it has
    been waiting on its peer (None while the server itself works on it)."""

    context: Any = attrs.field(repr=False)
    method: str
    peer: str
    name: str | None = None
    #: Counted against ``name``'s MAX_STREAMS_PER_CLIENT.
    claimed: bool = False
    messages: int = 0
    waiting_since: float | None = None
    cancelled: bool = False

    def deadline(self) -> float:
        return FIRST_MESSAGE_SECONDS if self.messages == 0 else STALL_SECONDS


class Guard:
    """What a call passes before any handler works on it, and the watchdog that cancels a
    call stuck on its peer. gRPC runs each call on one of a few threads, and a call that
    waits on its peer holds its thread: these bounds keep them free for honest clients."""

    def __init__(self, fed: Federation, revocations: Revocations | None) -> None:
        self.fed = fed
        self.revocations = revocations
        self.streams: dict[Any, Stream] = {}
        self.per_name: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.done = threading.Event()
        #: Set by SIGHUP; the watchdog rereads the revocation list (never in a signal handler).
        self.reload = threading.Event()
        self.thread: threading.Thread | None = None

    @contextlib.contextmanager
    def call(self, context: Any, method: str) -> Iterator[Stream]:
        """Admit one call for as long as its handler runs; the certificate is checked first
        thing, before any message is read."""
        stream = Stream(context, method, context.peer())
        with self.lock:
            self.streams[context] = stream
        try:
            if self.fed.identity_from_tls:
                self.check_certificate(stream)
            yield stream
        finally:
            with self.lock:
                del self.streams[context]
                if stream.claimed:
                    assert stream.name is not None
                    self.per_name[stream.name] -= 1

    def check_certificate(self, stream: Stream) -> None:
        fed, context = self.fed, stream.context
        name = tls_name(context)
        if name is None:
            fed.refuse(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "client_refused",
                "no client certificate common name",
            )
        if name not in fed.members:
            fed.refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "client_refused",
                not_allowed(name, fed.members),
                client=name,
            )
        pem = (context.auth_context().get("x509_pem_cert") or [b""])[0]
        if self.revocations is not None and self.revocations.revoked(pem):
            fed.refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                "client_revoked",
                f"the certificate of {name!r} is revoked",
                client=name,
            )
        assert name is not None
        self.claim(context, name)

    def claim(self, context: Any, name: str) -> None:
        """Count the call against ``name`` (the certificate's, or with ``--insecure`` the one
        its first message claims); refuse it at once beyond MAX_STREAMS_PER_CLIENT."""
        with self.lock:
            stream = self.streams[context]
            if stream.claimed:
                return
            full = self.per_name[name] >= MAX_STREAMS_PER_CLIENT
            if not full:
                self.per_name[name] += 1
                stream.name, stream.claimed = name, True
        if full:
            self.fed.refuse(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "rpc_refused",
                f"{name} has {MAX_STREAMS_PER_CLIENT} calls open, the most one client may",
                client=name,
            )

    def stream(self, context: Any) -> Stream | None:
        return self.streams.get(context)

    def read(self, context: Any, requests: Iterable[bytes]) -> Iterator[bytes]:
        """The call's messages, each awaited under the watchdog's deadline."""
        stream = self.streams[context]
        it = iter(requests)
        while True:
            stream.waiting_since = time.monotonic()
            try:
                message = next(it)
            except StopIteration:
                if stream.cancelled:  # by the watchdog, whose event is this call's one
                    context.abort(grpc.StatusCode.CANCELLED, "cancelled: its peer was idle")
                return
            finally:
                stream.waiting_since = None
            stream.messages += 1
            yield message

    def first(self, context: Any, requests: Iterable[bytes], what: str) -> bytes:
        """The one message of a call that a client makes as a unary call."""
        for message in self.read(context, requests):
            return message
        self.fed.refuse(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            "message_refused",
            f"truncated {what} call: it ended before its message",
        )
        raise AssertionError  # abort raised

    def write(self, context: Any, responses: Iterable[bytes]) -> Iterator[bytes]:
        """``responses``, each one's sending (gRPC resumes us once it is sent) under the
        watchdog's deadline: a peer that stops reading is cancelled too."""
        stream = self.streams[context]
        for message in responses:
            stream.waiting_since = time.monotonic()
            yield message
            stream.waiting_since = None

    # -- the watchdog's thread -------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self.watch, name="flcore-watchdog", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join()

    def watch(self) -> None:
        while not self.done.wait(WATCH_SECONDS):
            if self.reload.is_set():
                self.reload.clear()
                self.reread_revocations()
            self.cancel_stuck(time.monotonic())

    def cancel_stuck(self, now: float) -> None:
        """Cancel every call that has waited on its peer past its deadline."""
        with self.lock:
            stuck = [
                s
                for s in self.streams.values()
                if not s.cancelled
                and s.waiting_since is not None
                and now - s.waiting_since > s.deadline()
            ]
            for stream in stuck:
                stream.cancelled = True
        for stream in stuck:
            stream.context.cancel()
            reason = (
                f"sent nothing within {FIRST_MESSAGE_SECONDS:g} s of opening the call"
                if stream.messages == 0
                else f"moved no message for {STALL_SECONDS:g} s"
            )
            self.fed.log.warning(
                "stream_cancelled",
                client=stream.name,
                peer=stream.peer,
                method=stream.method,
                reason=reason,
            )

    def reread_revocations(self) -> None:
        """SIGHUP: read the CRL again; a bad one is logged and the last good list kept."""
        if self.revocations is None:
            return
        try:
            count = self.revocations.reload()
        except CertError as err:
            self.fed.log.warning("revocations_refused", reason=str(err))
        else:
            self.fed.log.info("revocations_loaded", path=str(self.revocations.path), revoked=count)
