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
    from flcore.context import FLContext


@attrs.frozen
class ClientResult:
    """One client's reply: a codec payload, or the reason it has none."""

    client_id: str
    payload: Payload | None = attrs.field(default=None, repr=False)
    error: str | None = None


class Runtime(ABC):
    """Where clients run. ``start`` returns the names of the clients that joined."""

    @abstractmethod
    def start(self, ctx: FLContext) -> list[str]:
        """Bring the clients up; return their names (each gets ``client_register``)."""

    @abstractmethod
    def run(
        self, ctx: FLContext, request: str, payload: Payload, clients: Sequence[str]
    ) -> Iterator[ClientResult]:
        """Send ``request`` with ``payload`` to ``clients``; yield replies as they come.

        Every client answers once per request: with a reply, or with an error (a failed or
        vanished client). Replies may come in any order.
        """

    @abstractmethod
    def stop(self, ctx: FLContext) -> None:
        """Release the clients; must be safe to call after a failed ``start``."""

    def present(self, clients: Sequence[str]) -> list[str]:
        """Which of ``clients`` are still in the federation when the run ends (each gets
        ``client_quit`` then); a runtime that drops clients mid-run leaves those out."""
        return list(clients)
