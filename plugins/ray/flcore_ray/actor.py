"""The body of one Ray actor: a few virtual clients, built once from the job's TOML text.

Like a worker of the core's process pool, an actor hosts its clients in a
:class:`flcore.ClientHost` (its own chain, since a PluginManager cannot be sent; its clients'
data loaded once; one model for all of them). Requests arrive as the codec's bytes through
Ray's object store; replies leave as the codec's bytes. Nothing here imports ray at module
level: the class is wrapped by ``ray.remote`` on use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flcore import ClientHost, Payload

    #: What an actor answers for one client: the codec reply, or why there is none.
    Answer = tuple[Payload | None, str | None]


class ClientActor:
    """Holds the clients at ``indices``; answers one client's request per call."""

    def __init__(
        self, job_text: str, source: str, indices: list[int], run_dir: str | None, threads: int
    ) -> None:
        self.fatal: str | None = None
        self.host: ClientHost | None = None
        self.payload_ref: Any = None
        self.payload: bytearray | None = None
        try:
            self._build(job_text, source, indices, run_dir, threads)
        except Exception as err:  # told to the server by ready(), which stops the run
            self.fatal = f"{type(err).__name__}: {err}"

    def _build(
        self, job_text: str, source: str, indices: list[int], run_dir: str | None, threads: int
    ) -> None:
        import torch

        from flcore import ClientHost, preload_client_modules

        torch.set_num_threads(threads)  # the same float results as every other runtime
        preload_client_modules()  # what the first round would import lazily: now, in parallel
        # The run directory when this node sees it (a local cluster): the run's event log,
        # and each client's state kept there for a resumed run. Elsewhere the state lives
        # in this actor's memory only.
        seen = run_dir if run_dir is not None and Path(run_dir).is_dir() else None
        self.host = ClientHost(job_text, source, indices, seen, worker=f"ray-{os.getpid()}")
        self.host.log.info("ray_actor_started", clients=sorted(self.host.clients))

    def ready(self) -> tuple[int, str | None]:
        """This actor's process id, and why it could not start (``None``: it is ready)."""
        return os.getpid(), self.fatal

    def handle(self, request: str, payload_refs: list[Any], client: str) -> Answer:
        """Answer ``request`` for ``client``. The payload comes as a reference in a list (so
        Ray does not resolve it per call): fetched and copied once per actor per request."""
        import ray

        if self.host is None:
            return None, f"its Ray actor could not start: {self.fatal}"
        ref = payload_refs[0]
        if ref != self.payload_ref or self.payload is None:
            self.host.request_done()  # the last request's decoded payload goes with it
            self.payload_ref, self.payload = None, None
            self.payload = bytearray(ray.get(ref))  # writable: clients decode it without copies
            self.payload_ref = ref
        return self.host.answer(client, request, self.payload)
