"""The clients of one process, built from the job's TOML text: what a pool worker, a Ray
actor or any runtime's remote process hosts.

A process of its own builds its own chain (a PluginManager cannot be sent), so the client
side has its own plugin instances on every runtime; its clients share one model instance
and one decoded request. A simulation keeps each client's state under
``RUN_DIR/clients/NAME`` (where that directory is reachable), so a resumed run finds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flcore.codec import Payload

#: The folder of a run directory that holds each simulated client's own state.
CLIENTS_DIR = "clients"


def client_state_dir(run_dir: str | Path | None, name: str) -> Path | None:
    """Where the simulated client ``name`` keeps its state: ``RUN_DIR/clients/NAME``."""
    return Path(run_dir) / CLIENTS_DIR / name if run_dir is not None else None


class ClientHost:
    """The clients at ``indices`` of the job in ``job_text``, ready to answer requests.

    ``log`` is where the clients' events go; ``None`` makes one that appends them to
    ``RUN_DIR/events.jsonl`` when ``run_dir`` is a directory this process sees (else drops
    them), each line marked with ``worker``. It is :attr:`log`, for the host's own events.
    """

    def __init__(
        self,
        job_text: str,
        source: str,
        indices: Sequence[int],
        run_dir: str | Path | None,
        log: Any = None,
        worker: str | None = None,
    ) -> None:
        from flcore.chain import Chain
        from flcore.client import Client, RequestMemo
        from flcore.job import Job, loads_toml
        from flcore.logging import make_logger
        from flcore.task import load_task

        if log is None:
            seen = run_dir is not None and Path(run_dir).is_dir()
            events = Path(run_dir) / "events.jsonl" if seen and run_dir is not None else None
            log = make_logger(events, console_level="critical")
        self.log = log.bind(worker=worker) if worker is not None else log
        log = self.log

        job = Job.from_dict(loads_toml(job_text, source), source=source)
        task = load_task(job)
        chain = Chain.for_job(job)
        model = task.model()  # one for all of this host's clients, as in the embedded runtime
        self.memo = RequestMemo()  # a request's payload serves all the clients: decoded once
        self.clients: dict[str, Client] = {}
        for i in indices:
            name = job.client_names[i]
            client = Client(
                job, task, chain, i, log, model, state_dir=client_state_dir(run_dir, name)
            )
            client.decoder = self.memo
            self.clients[name] = client

    def answer(
        self, client: str, request: str, payload: Payload
    ) -> tuple[Payload | None, str | None]:
        """``(reply, None)``, or ``(None, why)`` when the client failed
        (:meth:`flcore.client.Client.answer`)."""
        return self.clients[client].answer(request, payload)

    def request_done(self) -> None:
        """The request was answered by every client asked: its decoded payload may go."""
        self.memo.clear()


def preload_client_modules() -> None:
    """Import what a client's first round would import lazily (torch's optimizer machinery
    among it: seconds), so a host pays for it while it starts rather than in round 1."""
    import importlib

    from flcore.runtime.pool import PRELOAD

    for module in PRELOAD:
        importlib.import_module(module)
