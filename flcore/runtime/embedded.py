"""The embedded runtime: every client in this process, one after another, no server to start.

Requests and replies still cross as codec bytes, so an in-process run goes through the
same validation as a networked one. The clients get a chain of their own (fresh instances of
the job's plugins), as on every other runtime, so a plugin keeping state on ``self``
behaves the same wherever its clients run.

A client is built (and loads its data split) the first time a request goes to it: a job of
a million clients starts at once, and a round builds only the clients of its cohort.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from flcore.client import Client, RequestMemo, failure_reason
from flcore.codec import Payload
from flcore.context import ServerContext
from flcore.runtime.base import ClientResult, Runtime, TorchThreads
from flcore.runtime.host import client_state_dir

if TYPE_CHECKING:
    import torch

    from flcore.chain import Chain


class EmbeddedRuntime(Runtime):
    def __init__(self) -> None:
        self.clients: dict[str, Client] = {}  # those built so far
        self.index: dict[str, int] = {}  # every member's data index, by name
        self.threads = TorchThreads()  # the clients train here, on the job's threads
        self.memo = RequestMemo()  # one request payload, decoded once for every client
        self.shared: torch.nn.Module | None = None  # one model for a hundred clients, not a hundred
        self.chain: Chain | None = None  # the clients' own plugin instances

    def start(self, ctx: ServerContext) -> list[str]:
        self.threads.hold(ctx.job.job.threads)
        self.shared = ctx.task.model()
        self.chain = ctx._chain.fresh()
        names = ctx.job.client_names
        self.index = {name: index for index, name in enumerate(names)}
        return list(names)

    def client(self, ctx: ServerContext, name: str) -> Client:
        """The client ``name``, built on its first request. Building loads its data and
        leaves the shared model alone, and a client seeds its own work (its split by its
        name, its training by round and name), so when it is built changes nothing it
        computes."""
        client = self.clients.get(name)
        if client is None:
            client = Client(
                ctx.job,
                ctx.task,
                self.chain,
                self.index[name],
                ctx.log,
                model=self.shared,
                name=name,
                state_dir=client_state_dir(ctx.run_dir, name),
            )
            client.decoder = self.memo
            self.clients[name] = client
        return client

    def run(
        self, ctx: ServerContext, request: str, payload: Payload, clients: Sequence[str]
    ) -> Iterator[ClientResult]:
        try:
            for name in clients:
                try:
                    client = self.client(ctx, name)
                except Exception as err:  # its data would not load: it misses this round
                    yield ClientResult(name, error=failure_reason(err))
                    continue
                reply, error = client.answer(request, payload)
                yield ClientResult(name, payload=reply, error=error)
        finally:
            self.memo.clear()  # the request's payload is not kept past its round

    def stop(self, ctx: ServerContext) -> None:
        self.clients.clear()
        self.index.clear()
        self.shared = self.chain = None
        self.threads.release()
