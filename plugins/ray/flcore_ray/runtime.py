"""The Ray runtime: virtual clients in Ray actors, placed by the CPUs and GPUs they reserve.

Per request the global model goes into Ray's object store once (``ray.put``) and every
actor reads it from there; each client's reply is its own object, collected with
``ray.wait`` as soon as it is done, so the server holds one contribution at a time while
the trainer folds them into FedAvg. An actor whose process dies fails the calls it had
not answered (those clients are dropped for the round); Ray restarts it up to
``max_restarts`` times, and its clients answer again from the next request on.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from flcore import ClientResult, FLCoreError, Runtime, client_job_text
from flcore_ray.actor import ClientActor
from flcore_ray.settings import RaySettings

if TYPE_CHECKING:
    from flcore import Payload, ServerContext


def read_answer(value: Any, client: str) -> ClientResult:
    """An actor's answer as a :class:`ClientResult`; anything else is that client's error."""
    if isinstance(value, tuple) and len(value) == 2:
        reply, error = value
        if isinstance(reply, bytes | bytearray) and error is None:
            return ClientResult(client, payload=reply)
        if reply is None and isinstance(error, str):
            return ClientResult(client, error=error)
    return ClientResult(client, error=f"its actor answered {type(value).__name__}, not a reply")


class RayRuntime(Runtime):
    """``[job] runtime = "ray"``: the job's clients dealt round-robin to Ray actors."""

    def __init__(self, settings: RaySettings) -> None:
        self.settings = settings
        self.actors: list[Any] = []
        #: Each actor's process id when it started (tests kill them to see a worker die).
        self.pids: list[int] = []
        self.assignment: dict[str, int] = {}
        #: Actors that lost a call: Ray may be restarting them. Checked before the next request.
        self.suspect: set[int] = set()
        #: Actors Ray will not restart again: their clients answer with an error at once.
        self.gone: dict[int, str] = {}
        self.started_ray = False

    # -- start ------------------------------------------------------------------------

    def connect(self, ctx: ServerContext) -> None:
        """Join the Ray instance this process is already in, or the one the settings name."""
        import ray

        if ray.is_initialized():
            if self.settings.address is not None:
                ctx.log.warning(
                    "ray_already_initialized",
                    address=self.settings.address,
                    message="this process already joined a Ray instance: using it",
                )
            return
        try:
            ray.init(address=self.settings.address, include_dashboard=False)
        except Exception as err:  # Ray raises ConnectionError, RuntimeError, ValueError...
            where = ctx.job.where("plugins.ray")
            raise FLCoreError(
                f"{where}.address: cannot join Ray at {self.settings.address or 'its default'}:"
                f" {type(err).__name__}: {err}"
            ) from err
        self.started_ray = True

    def actor_count(self, clients: int) -> int:
        """The ``actors`` setting, or as many actors as the cluster's resources fit."""
        import ray

        s = self.settings
        if s.actors is not None:
            return min(s.actors, clients)
        resources = ray.cluster_resources()
        fit = math.floor(resources.get("CPU", 0.0) / s.cpus_per_client + 1e-9)
        if s.gpus_per_client > 0:
            fit = min(fit, math.floor(resources.get("GPU", 0.0) / s.gpus_per_client + 1e-9))
        return max(1, min(fit, clients))

    def start(self, ctx: ServerContext) -> list[str]:
        # refuses plugins given in Python with client-side hooks; server-only ones stay here
        job_text = client_job_text(ctx, "runtime", "Ray actors")
        import ray

        self.connect(ctx)
        s = self.settings
        names = ctx.job.client_names
        n_clients = len(names)
        count = self.actor_count(n_clients)
        run_dir = str(ctx.run_dir) if ctx.run_dir else None
        remote = ray.remote(ClientActor).options(
            num_cpus=s.cpus_per_client,
            num_gpus=s.gpus_per_client,
            max_restarts=s.max_restarts,
            max_task_retries=0,  # a call lost with its actor is a dropped client, not a retry
        )
        for a in range(count):
            indices = list(range(a, n_clients, count))
            self.actors.append(
                remote.remote(job_text, ctx.job.source, indices, run_dir, ctx.job.job.threads)
            )
            for i in indices:
                self.assignment[names[i]] = a
        ctx.log.info(
            "ray_actors", actors=count, clients=n_clients, resources=ray.available_resources()
        )
        self.await_ready(ctx, count)
        return list(names)

    def await_ready(self, ctx: ServerContext, count: int) -> None:
        import ray

        s = self.settings
        refs = [actor.ready.remote() for actor in self.actors]
        _, waiting = ray.wait(refs, num_returns=len(refs), timeout=s.start_timeout)
        if waiting:
            raise FLCoreError(
                f"{len(waiting)} of {count} Ray actors did not start within "
                f"{s.start_timeout:g} s ({ctx.job.where('plugins.ray')}.start_timeout): each "
                f"reserves {s.cpus_per_client:g} CPU and {s.gpus_per_client:g} GPU, the "
                f"cluster has {ray.cluster_resources()}; lower cpus_per_client or actors"
            )
        for a, ref in enumerate(refs):
            try:
                pid, fatal = ray.get(ref)
            except ray.exceptions.RayError as err:
                raise FLCoreError(f"Ray actor {a} could not start: {err}") from err
            if fatal is not None:
                raise FLCoreError(f"Ray actor {a} could not start: {fatal}")
            self.pids.append(pid)

    def recover(self, ctx: ServerContext) -> None:
        """Wait for the actors that lost calls: restarted ones (their clients' data loaded
        again) take requests again, those Ray gave up on are gone for the rest of the run."""
        import ray

        for a in sorted(self.suspect):
            ref = self.actors[a].ready.options(max_task_retries=-1).remote()
            try:
                pid, fatal = ray.get(ref, timeout=self.settings.start_timeout)
            except ray.exceptions.GetTimeoutError:
                ray.cancel(ref)
                ctx.log.warning("ray_actor_restarting", actor=a, waited=self.settings.start_timeout)
                continue  # still suspect: its clients fail this request, it is asked again
            except ray.exceptions.RayError as err:
                self.gone[a] = _first_line(err)
            else:
                if fatal is not None:
                    self.gone[a] = f"it could not restart: {fatal}"
                else:
                    self.pids[a] = pid
                    ctx.log.warning("ray_actor_restarted", actor=a, pid=pid)
            if a in self.gone:
                ctx.log.warning("ray_actor_gone", actor=a, reason=self.gone[a])
            self.suspect.discard(a)

    # -- run --------------------------------------------------------------------------

    def run(
        self, ctx: ServerContext, request: str, payload: Payload, clients: Sequence[str]
    ) -> Iterator[ClientResult]:
        import numpy as np
        import ray

        self.recover(ctx)
        # once into the object store: every actor reads this one copy
        shared = ray.put(np.frombuffer(payload, dtype=np.uint8))
        del payload
        pending: dict[Any, tuple[str, int]] = {}
        for name in clients:
            a = self.assignment[name]
            if a in self.gone:
                yield ClientResult(name, error=f"its Ray actor is gone: {self.gone[a]}")
                continue
            pending[self.actors[a].handle.remote(request, [shared], name)] = (name, a)
        del shared  # the actors' calls hold the object now
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                ref = ready[0]
                name, a = pending.pop(ref)
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayActorError as err:
                    self.suspect.add(a)
                    yield ClientResult(name, error=f"its Ray actor died: {_first_line(err)}")
                    continue
                except ray.exceptions.RayError as err:  # lost object, crashed worker, ...
                    yield ClientResult(name, error=f"Ray failed it: {_first_line(err)}")
                    continue
                finally:
                    del ref, ready
                result = read_answer(value, name)
                del value
                yield result
                del result  # a reply is the size of the model: never hold two
        finally:  # the trainer stopped reading (a failed round): drop the calls not yet run
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref)

    def present(self, clients: Sequence[str]) -> list[str]:
        """The clients still in the federation: not those of an actor that is gone."""
        return [c for c in clients if self.assignment.get(c) not in self.gone]

    # -- stop -------------------------------------------------------------------------

    def stop(self, ctx: ServerContext) -> None:
        import ray

        if ray.is_initialized():
            for actor in self.actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception as err:  # an actor already gone cannot be killed twice
                    ctx.log.debug("ray_kill_failed", error=str(err))
        self.actors, self.pids, self.assignment = [], [], {}
        self.suspect, self.gone = set(), {}
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


__all__ = ["RayRuntime", "read_answer"]
