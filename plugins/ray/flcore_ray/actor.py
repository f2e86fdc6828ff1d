"""The body of one Ray actor: a few virtual clients, built once from the job's TOML text.

Like a worker of the core's process pool, an actor builds its own chain (a PluginManager
cannot be sent), loads its clients' data once and keeps one model for all of them. Requests
arrive as the codec's bytes through Ray's object store; replies leave as the codec's bytes.
Nothing here imports ray at module level: the class is wrapped by ``ray.remote`` on use.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

#: What an actor answers for one client: the codec reply, or why there is none.
Answer = tuple[bytes | bytearray | None, str | None]


class ClientActor:
    """Holds the clients at ``indices``; answers one client's request per call."""

    def __init__(
        self, job_text: str, source: str, indices: list[int], run_dir: str | None, threads: int
    ) -> None:
        self.fatal: str | None = None
        self.clients: dict[str, Any] = {}
        self.payload_ref: Any = None
        self.payload: bytearray | None = None
        try:
            self._build(job_text, source, indices, run_dir, threads)
        except Exception as err:  # told to the server by ready(), which stops the run
            self.fatal = f"{type(err).__name__}: {err}"

    def _build(
        self, job_text: str, source: str, indices: list[int], run_dir: str | None, threads: int
    ) -> None:
        import importlib

        import torch

        from flcore.chain import Chain
        from flcore.client import Client, client_name
        from flcore.job import Job
        from flcore.logging import make_logger
        from flcore.runtime.pool import PRELOAD
        from flcore.task import load_task

        torch.set_num_threads(threads)  # the same float results as every other runtime
        for module in PRELOAD:  # what the first round would import lazily: now, in parallel
            importlib.import_module(module)
        # the run's event log when this node sees the run directory (a local cluster)
        events = Path(run_dir) / "events.jsonl" if run_dir and Path(run_dir).is_dir() else None
        log = make_logger(events, console_level="critical").bind(worker=f"ray-{os.getpid()}")
        job = Job.from_dict(tomllib.loads(job_text), source=source)
        task = load_task(job)
        chain = Chain.for_job(job)
        shared = task.model()
        self.clients = {client_name(i): Client(job, task, chain, i, log, shared) for i in indices}

    def ready(self) -> tuple[int, str | None]:
        """This actor's process id, and why it could not start (``None``: it is ready)."""
        return os.getpid(), self.fatal

    def handle(self, request: str, payload_refs: list[Any], client: str) -> Answer:
        """Answer ``request`` for ``client``. The payload comes as a reference in a list (so
        Ray does not resolve it per call): fetched and copied once per actor per request."""
        import ray

        from flcore.errors import FLCoreError

        if self.fatal is not None:
            return None, f"its Ray actor could not start: {self.fatal}"
        ref = payload_refs[0]
        if ref != self.payload_ref:
            self.payload_ref, self.payload = None, None
            self.payload = bytearray(ray.get(ref))  # writable: clients decode it without copies
            self.payload_ref = ref
        try:
            reply = self.clients[client].handle(request, self.payload)
        except FLCoreError as err:
            return None, str(err)
        except Exception as err:  # the user's code on a client may fail in any way
            return None, f"{type(err).__name__}: {err}"
        return reply, None
