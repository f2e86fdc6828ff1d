"""The runtime seam: the trainer hands a runtime serialized requests and gets serialized
replies back, in whatever order clients finish. An in-process loop, a process pool, a Ray
cluster and a gRPC deployment differ only behind this interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import attrs

from flcore.codec import Payload

if TYPE_CHECKING:
    from flcore.context import ServerContext


#: Hooks that run where the clients are: a plugin with one of them must be loadable there.
CLIENT_HOOKS = (
    "local_optimizer",
    "local_loss_term",
    "after_optimizer_step",
    "send_update",
    "receive_model",
    "receive_validation_models",
    "send_validation_results",
    "send_best_model",
    "local_train",
    "evaluate",
    "predict",
    "client_request",
)


def job_for_remote_clients(ctx: ServerContext, setting: str, place: str) -> str:
    """The job as TOML for clients in other processes, which load plugins from entry points.

    Plugins given in Python (tests, stacks composed in code) cannot be loaded there: those
    with server hooks only stay in the server and are left out of the clients' chain; one
    with a client-side hook is a :class:`JobError` naming ``[job] setting``.
    """
    from flcore.errors import JobError
    from flcore.job import dump_toml

    given = [n for n, origin in ctx._chain.origins.items() if origin != "entry point"]
    client_side = {n for hook in CLIENT_HOOKS for n, _ in ctx._chain.implementations(hook)}
    if client_side & set(given):
        raise JobError(
            f"{ctx.job.where('job')}.{setting}: plugins {sorted(client_side & set(given))} were "
            f"given in Python, not installed, and have client-side hooks that {place} cannot "
            "load; install them or run the clients in this process"
        )
    section = dict(ctx.job.raw.get("plugins", {}))
    section["chain"] = [n for n in section.get("chain", []) if n not in given]
    for name in given:
        section.pop(name, None)
    return dump_toml({**ctx.job.raw, "plugins": section})


class TorchThreads:
    """torch's intra-op thread count of this process, set while a runtime runs and given
    back when it stops: results depend on it for work done here, and so does contention
    with clients elsewhere."""

    def __init__(self) -> None:
        self.before: int | None = None

    def hold(self, threads: int) -> None:
        import torch

        if self.before is None:
            self.before = torch.get_num_threads()
        torch.set_num_threads(threads)

    def release(self) -> None:
        if self.before is not None:
            import torch

            torch.set_num_threads(self.before)
            self.before = None


@attrs.frozen
class ClientResult:
    """One client's reply: a codec payload, or the reason it has none."""

    client_id: str
    payload: Payload | None = attrs.field(default=None, repr=False)
    error: str | None = None


class Runtime(ABC):
    """Where clients run. ``start`` returns the names of the clients that joined."""

    @abstractmethod
    def start(self, ctx: ServerContext) -> list[str]:
        """Bring the clients up; return their names (each gets ``client_register``)."""

    @abstractmethod
    def run(
        self, ctx: ServerContext, request: str, payload: Payload, clients: Sequence[str]
    ) -> Iterator[ClientResult]:
        """Send ``request`` with ``payload`` to ``clients``; yield replies as they come.

        Every client answers once per request: with a reply, or with an error (a failed or
        vanished client). Replies may come in any order.
        """

    @abstractmethod
    def stop(self, ctx: ServerContext) -> None:
        """Release the clients; must be safe to call after a failed ``start``."""

    def present(self, clients: Sequence[str]) -> list[str]:
        """Which of ``clients`` are still in the federation when the run ends (each gets
        ``client_quit`` then); a runtime that drops clients mid-run leaves those out."""
        return list(clients)
