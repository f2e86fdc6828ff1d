"""The parallel local runtime: clients in a pool of worker processes started once per run.

Each worker builds its own chain from the job (a PluginManager cannot be pickled), loads
its clients' data once, and answers requests over a socket pair. Models cross as the
codec's bytes (a JSON header, then raw bytes; never pickled). A request goes once to each
worker, and replies are handed to the trainer in client order as they come, so that it
folds them while later clients still train.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy

from flcore.codec import Payload
from flcore.context import ServerContext
from flcore.errors import FLCoreError
from flcore.runtime.base import (
    CLIENT_HOOKS,
    ClientResult,
    Runtime,
    TorchThreads,
    job_for_remote_clients,
)

__all__ = ["CLIENT_HOOKS", "ProcessPoolRuntime", "worker_main"]


def _send(conn: Connection, header: dict[str, Any], payload: Payload | None = None) -> None:
    """A JSON header as one message; a payload follows as raw bytes, its size in the header."""
    if payload is not None:
        header = {**header, "size": len(payload)}
    conn.send_bytes(json.dumps(header).encode())
    if payload is not None:
        view, fd = memoryview(payload), conn.fileno()
        while view:
            view = view[os.write(fd, view) :]


def _receive(conn: Connection) -> tuple[dict[str, Any], memoryview | None]:
    """The header, and the payload read straight into a buffer of our own: recv_bytes would
    gather it in a BytesIO and copy it out, holding the model twice. The buffer is not
    zeroed first (a bytearray would be): every byte of it is read into."""
    header = json.loads(conn.recv_bytes())
    size = header.get("size")
    if size is None:
        return header, None
    view, fd, got = numpy.empty(size, dtype=numpy.uint8).data, conn.fileno(), 0
    while got < size:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise EOFError("the pipe closed in the middle of a payload")
        got += n
    return header, view


class Outbox:
    """A worker's messages to the server, written by a thread of their own.

    The server reads replies in client order, so a worker whose reply is not next waits
    until it is. Written from the worker's main thread, that wait (the server reading and
    folding the other worker's reply, a few ms for a 1 M-parameter model) was time the
    worker did not train: up to a fifth of a round in benchmark case B2. The thread takes
    the wait instead, while the main thread trains the next client. At most ``depth``
    messages wait in the worker, so a slow server still holds back a worker's memory.
    """

    def __init__(self, conn: Connection, depth: int = 2) -> None:
        self.conn = conn
        self.error: BaseException | None = None
        self._queue: queue.Queue[tuple[dict[str, Any], Payload | None] | None] = queue.Queue(depth)
        self._thread = threading.Thread(target=self._write, name="flcore-outbox", daemon=True)
        self._thread.start()

    def send(self, header: dict[str, Any], payload: Payload | None = None) -> None:
        if self.error is not None:
            raise self.error
        self._queue.put((header, payload))

    def close(self) -> None:
        """Send what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _write(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is None:
                try:
                    _send(self.conn, *item)
                except OSError as err:  # the server is gone: the main thread stops on it
                    self.error = err
            del item  # a reply is the size of the model: not held while the next waits


def worker_main(
    conn: Connection,
    job_text: str,
    source: str,
    indices: list[int],
    run_dir: str | None,
    threads: int,
) -> None:
    """A worker's whole life: build its clients, then answer until told to stop."""
    import torch

    from flcore.logging import make_logger
    from flcore.runtime.host import ClientHost

    torch.set_num_threads(threads)
    log = make_logger(Path(run_dir) / "events.jsonl" if run_dir else None)
    try:
        host = ClientHost(job_text, source, indices, run_dir, log.bind(worker=os.getpid()))
    except Exception as err:  # reported to the server, which stops the run
        _send(conn, {"fatal": f"{type(err).__name__}: {err}"})
        return
    log.info("worker_started", worker=os.getpid(), clients=sorted(host.clients))
    _send(conn, {"ready": True})
    outbox = Outbox(conn)
    try:
        _serve(conn, outbox, host)
    finally:
        outbox.close()


def _serve(conn: Connection, outbox: Outbox, host: Any) -> None:
    while True:
        try:
            header, payload = _receive(conn)
        except EOFError:
            return
        if header.get("request") == "stop" or payload is None:
            return
        for name in header["clients"]:
            reply, error = host.answer(name, header["request"], payload)
            if reply is None:
                outbox.send({"client": name, "error": error})
            else:
                outbox.send({"client": name}, reply)
            del reply
        host.request_done()
        del payload
        outbox.send({"done": True})


#: Imported once by the fork server, so that workers start with them loaded. torch._dynamo
#: is what the first optimizer step imports lazily: seconds per worker otherwise. A worker
#: also imports this module (its entry point) and, as multiprocessing does, the parent's
#: main module again (``flcore run``'s is ``flcore.cli``, a script's imports ``flcore.run``):
#: 50-80 ms of imports per worker at every run's start when they were not preloaded.
PRELOAD = [
    "torch",
    "torch._dynamo",
    "flcore.client",
    "flcore.chain",
    "flcore.task",
    "flcore.job",
    "flcore.logging",
    "flcore.run",
    "flcore.cli",
    "flcore.runtime.pool",
    "flcore.runtime.host",
    "flcore.defaults.local_training",
    "flcore.defaults.evaluation",
]


def _context(task_module: str) -> Any:
    """Workers fork from a fork server that imported torch (and the task) once, instead of
    each paying for the imports; the fork server is a clean, single-threaded process, so
    forking it is safe."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        mp = multiprocessing.get_context("forkserver")
        mp.set_forkserver_preload([*PRELOAD, task_module])
        return mp
    return multiprocessing.get_context("spawn")


def _await_ready(conn: Connection) -> str | None:
    """Wait for a new worker's first message: ``None`` when it is ready, else why not."""
    try:
        header = json.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return "the worker process died while starting"
    fatal = header.get("fatal")
    return str(fatal) if fatal is not None else None


class ProcessPoolRuntime(Runtime):
    """``[job] workers = N``: N worker processes, clients dealt to them round-robin."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        self.assignment: dict[str, int] = {}
        self.indices: list[list[int]] = []
        #: Workers whose pipe failed in a request: restarted before the next one.
        self.broken: set[int] = set()
        self.job_text = ""
        self.mp: Any = None
        self.threads = TorchThreads()

    def start(self, ctx: ServerContext) -> list[str]:
        # The server's own work (reading, checking, folding) runs between the workers': with
        # more torch threads, idle OpenMP threads spin on the cores the workers train on
        # (measured: 4 CPU-seconds instead of 1 in case B2, and rounds 30 % slower).
        self.threads.hold(1)
        self.job_text = job_for_remote_clients(ctx, "workers", "worker processes")
        self.mp = _context(ctx.job.job.task.partition(":")[0])
        n_clients = ctx.job.job.clients
        names = ctx.job.client_names
        workers = min(self.workers, n_clients)
        self.indices = [list(range(w, n_clients, workers)) for w in range(workers)]
        for w, indices in enumerate(self.indices):
            proc, conn = self._spawn(ctx, w)
            self.procs.append(proc)
            self.conns.append(conn)
            for i in indices:
                self.assignment[names[i]] = w
        for w, conn in enumerate(self.conns):
            fatal = _await_ready(conn)
            if fatal is not None:
                self.stop(ctx)
                raise FLCoreError(f"worker {w} could not start: {fatal}")
        return list(names)

    def _spawn(self, ctx: ServerContext, w: int) -> tuple[Any, Connection]:
        parent, child = self.mp.Pipe()
        proc = self.mp.Process(
            target=worker_main,
            args=(
                child,
                self.job_text,
                ctx.job.source,
                self.indices[w],
                str(ctx.run_dir) if ctx.run_dir else None,
                ctx.job.job.threads,
            ),
            daemon=True,
            name=f"flcore-worker-{w}",
        )
        proc.start()
        child.close()
        return proc, parent

    def restart_dead(self, ctx: ServerContext) -> None:
        """A worker that died (killed, out of memory) is started again before the next
        request, so its clients rejoin instead of missing every later round; their
        per-client state comes back from the run directory. A worker that cannot start again
        leaves its clients failing this request, each with the reason."""
        for w, proc in enumerate(self.procs):
            if proc.is_alive() and w not in self.broken:
                continue
            if proc.is_alive():  # its pipe failed or went out of step: it cannot be trusted
                proc.kill()
            proc.join(timeout=10)
            code = proc.exitcode
            self.broken.discard(w)
            self.conns[w].close()
            new, conn = self._spawn(ctx, w)
            fatal = _await_ready(conn)
            self.procs[w], self.conns[w] = new, conn
            clients = [n for n, i in self.assignment.items() if i == w]
            if fatal is None:
                ctx.log.warning("worker_restarted", worker=w, exit_code=code, clients=clients)
            else:
                ctx.log.error("worker_restart_failed", worker=w, error=fatal, clients=clients)

    def run(
        self, ctx: ServerContext, request: str, payload: Payload, clients: Sequence[str]
    ) -> Iterator[ClientResult]:
        """Replies come back in the order of ``clients``, the order the trainer folds them in.

        A worker answers its clients in that order, so the next reply to fold is always the
        next message of one worker, and that is the only pipe read. A worker whose reply is
        not next waits on its full pipe meanwhile, so the server never holds a reply it
        cannot fold yet: its memory is the accumulator and one reply, whatever the number
        of clients. A consumer that stops early leaves nothing behind: the rest of the
        round's replies are read and dropped, so the next request starts clean.
        """
        self.restart_dead(ctx)
        by_worker: dict[int, list[str]] = {}
        for name in clients:
            by_worker.setdefault(self.assignment[name], []).append(name)
        gone: dict[int, str] = {}
        for w, names in by_worker.items():
            try:
                _send(self.conns[w], {"request": request, "clients": names}, payload)
            except (BrokenPipeError, OSError):
                gone[w] = f"worker {w} is gone"
        del payload  # sent to every worker: the server need not hold it while they train
        unread = {w: len(names) + 1 for w, names in by_worker.items()}  # replies, then "done"
        try:
            for name in clients:
                w = self.assignment[name]
                if w in gone:
                    yield ClientResult(name, error=gone[w])
                    continue
                try:
                    header, reply = self._next(w, unread)
                    if header.get("client") != name:
                        raise EOFError(f"answered for {header.get('client')!r}, not {name!r}")
                except (EOFError, OSError, ValueError) as err:
                    gone[w] = "its worker process died" + (f" ({err})" if str(err) else "")
                    yield ClientResult(name, error=gone[w])
                    continue
                yield ClientResult(name, payload=reply, error=header.get("error"))
                reply = None  # let the trainer drop it before the next one is read
        finally:
            for w in by_worker:
                while w not in gone and unread[w]:
                    try:
                        self._next(w, unread)
                    except (EOFError, OSError, ValueError):
                        gone[w] = "gone"
            self.broken.update(gone)

    def _next(self, worker: int, unread: dict[int, int]) -> tuple[dict[str, Any], Any]:
        unread[worker] -= 1
        return _receive(self.conns[worker])

    def stop(self, ctx: ServerContext) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):  # a dead worker's pipe is broken
                _send(conn, {"request": "stop"})
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []
        self.threads.release()
