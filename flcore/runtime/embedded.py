"""The embedded runtime: every client in this process, one after another, no server to start.

Requests and replies still cross as codec bytes, so an in-process run goes through the
same validation as a networked one. The clients get a chain of their own (fresh instances of
the job's plugins), as on every other runtime, so a plugin keeping state on ``self``
behaves the same wherever its clients run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from flcore.client import Client, RequestMemo
from flcore.codec import Payload
from flcore.context import ServerContext
from flcore.errors import FLCoreError
from flcore.runtime.base import ClientResult, Runtime, TorchThreads
from flcore.runtime.host import client_state_dir


class EmbeddedRuntime(Runtime):
    def __init__(self) -> None:
        self.clients: dict[str, Client] = {}
        self.threads = TorchThreads()  # the clients train here, on the job's threads
        self.memo = RequestMemo()  # one request payload, decoded once for every client

    def start(self, ctx: ServerContext) -> list[str]:
        self.threads.hold(ctx.job.job.threads)
        shared = ctx.task.model()  # one model for all: a hundred clients need not hold a hundred
        chain = ctx._chain.fresh()
        for index, name in enumerate(ctx.job.client_names):
            client = Client(
                ctx.job,
                ctx.task,
                chain,
                index,
                ctx.log,
                model=shared,
                state_dir=client_state_dir(ctx.run_dir, name),
            )
            client.decoder = self.memo
            self.clients[client.name] = client
        return list(self.clients)

    def run(
        self, ctx: ServerContext, request: str, payload: Payload, clients: Sequence[str]
    ) -> Iterator[ClientResult]:
        try:
            for name in clients:
                try:
                    reply = self.clients[name].handle(request, payload)
                except FLCoreError as err:
                    yield ClientResult(name, error=str(err))
                except Exception as err:  # the user's code on a client may fail in any way
                    yield ClientResult(name, error=f"{type(err).__name__}: {err}")
                else:
                    yield ClientResult(name, payload=reply)
        finally:
            self.memo.clear()  # the request's payload is not kept past its round

    def stop(self, ctx: ServerContext) -> None:
        self.clients.clear()
        self.threads.release()
