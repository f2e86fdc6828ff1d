"""Helpers for the deployment tests: certificates, job files and real `flcore server` /
`flcore client` processes on 127.0.0.1, every one killed when the test ends."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flcore.job import Job
from tests.conftest import ROOT

#: Generous: the test machine may be a loaded two-core box.
TIMEOUT = 180.0


def wait_for(check: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Poll ``check`` until it returns something true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def rss_bytes(pid: int) -> int:
    """The resident memory of process ``pid`` (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


class Deployment:
    """Starts processes in ``folder`` with ``python`` (default: this one); :meth:`close` kills
    every one still running."""

    def __init__(self, folder: Path, python: Path | None = None) -> None:
        self.folder = folder
        self.python = str(python) if python is not None else sys.executable
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def certs(self, name: str = "certs", clients: tuple[str, ...] = (), *extra: str) -> Path:
        """``flcore certs`` in ``folder/name`` (a server certificate too for ``certs``)."""
        folder = self.folder / name
        hosts = ["--host", "127.0.0.1"] if name == "certs" else []
        args = [*hosts, *[a for c in clients for a in ("--client", c)], *extra]
        done = self.flcore("certs", str(folder), *args)
        assert done.returncode == 0, done.stderr
        return folder

    def job(self, job: Job, name: str = "job.toml") -> Path:
        path = self.folder / name
        path.write_text(job.to_toml())
        return path

    def flcore(self, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.python, "-m", "flcore", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, log: str, *args: str) -> subprocess.Popen[bytes]:
        path = self.folder / log
        with open(path, "ab") as out:
            proc = subprocess.Popen(
                [self.python, "-m", "flcore", *args],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append((proc, path))
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return next(p for q, p in self.procs if q is proc).read_text(errors="replace")

    def server(
        self,
        job: Path,
        run_dir: Path,
        *extra: str,
        port: int = 0,
        log: str = "server.log",
        certs: str = "certs",
    ) -> tuple[subprocess.Popen[bytes], str]:
        """Start ``flcore server`` (mutual TLS with ``certs`` unless ``extra`` says
        otherwise) and wait until it listens; return it and its address."""
        address = run_dir / "server.json"
        address.unlink(missing_ok=True)
        where = ["--resume", str(run_dir)] if "--resume" in extra else ["--out", str(run_dir)]
        tls = [] if "--insecure" in extra else ["--certs", str(self.folder / certs)]
        rest = [e for e in extra if e != "--resume"]
        proc = self.start(
            log, "server", str(job), "--listen", f"127.0.0.1:{port}", *tls, *where, "-v", *rest
        )

        def listening() -> str | None:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited early:\n{self.log(proc)}")
            if not address.exists():
                return None
            return str(json.loads(address.read_text())["address"])

        return proc, wait_for(listening, "the server to listen")

    def client(
        self, address: str, name: str, job: Path | None, *extra: str, certs: str = "certs"
    ) -> subprocess.Popen[bytes]:
        """Start ``flcore client``; ``job`` None: no ``--job`` (give ``--task`` in ``extra``)."""
        tls = [] if "--insecure" in extra else ["--certs", str(self.folder / certs)]
        return self.start(
            f"{name}.log",
            "client",
            "--server",
            address,
            "--name",
            name,
            *(["--job", str(job)] if job is not None else []),
            *tls,
            "-v",
            *extra,
        )

    def wait(self, proc: subprocess.Popen[bytes], timeout: float = TIMEOUT) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process did not end:\n{self.log(proc)}") from None

    def close(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def deployment_in(folder: Path, python: Path | None = None) -> Iterator[Deployment]:
    """A :class:`Deployment` whose processes are all killed on leaving."""
    dep = Deployment(folder, python)
    try:
        yield dep
    finally:
        dep.close()
