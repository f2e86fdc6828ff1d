"""``flcore run`` as a function: load the chain and the task, check, train, write the run directory."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from flcore import codec
from flcore.chain import Chain
from flcore.durable import StorageError
from flcore.errors import FLCoreError
from flcore.job import Job
from flcore.logging import close_logger, make_logger
from flcore.task import load_task
from flcore.training import GLOBAL_MODEL, ResumeRefused, Training

SUMMARY = "summary.json"


@attrs.frozen
class RunResult:
    """What a finished run leaves: its directory, the metrics of every round."""

    run_dir: Path
    history: list[dict[str, Any]]

    @property
    def final_metrics(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    @property
    def global_model_path(self) -> Path:
        return self.run_dir / GLOBAL_MODEL


def prepare(job: Job, extra_plugins: Mapping[str, Any] | None = None, log: Any = None) -> Training:
    """Everything before training: plugins, settings, task, the chain's checks.
    Raises a :class:`FLCoreError` naming the problem; writes nothing."""
    chain = Chain.for_job(job, extra_plugins)
    task = load_task(job)
    training = Training(job, chain, task, None, log or make_logger(None, console_level="critical"))
    training.check()
    return training


def new_run_dir(job: Job, out: str | Path | None) -> Path:
    if out is not None:
        path = Path(out)
        if path.exists() and any(path.iterdir()):
            raise FLCoreError(f"--out {str(path)!r} exists and is not empty")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path("runs") / f"{job.job.name}-{stamp}"
        suffix = 1
        while path.exists():
            suffix += 1
            path = Path("runs") / f"{job.job.name}-{stamp}-{suffix}"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(path, err) from err
    return path.resolve()


def _write(path: Path, text: str) -> None:
    """Write a file of the run directory atomically; a full disk is a :class:`StorageError`."""
    try:
        codec.write_atomic(path, text.encode())
    except OSError as err:
        raise StorageError(path, err) from err


def resume_job(run_dir: str | Path, job: Job | None = None) -> Job:
    """The job of the run in ``run_dir``; a ``job`` given as well must be the same job
    (anything else would not continue the run to the weights it was heading for). A
    ``job.toml`` edited since the run began is refused when the checkpoint is read: it
    records the job's digest (:meth:`Training.load_checkpoint`)."""
    path = Path(run_dir) / "job.toml"
    if not path.is_file():
        raise FLCoreError(f"cannot resume {str(run_dir)!r}: no job.toml (not a run directory)")
    saved = Job.load(path)
    if job is not None and job.to_toml() != saved.to_toml():
        raise FLCoreError(
            f"cannot resume {str(run_dir)!r}: the job given differs from its job.toml "
            "(resume with the same job file and --set overrides, or with no job file)"
        )
    return saved


def run_job(
    job: Job,
    out: str | Path | None = None,
    extra_plugins: Mapping[str, Any] | None = None,
    console: Literal["console", "json", "quiet"] = "quiet",
    console_level: str = "warning",
    resume: bool = False,
    runtime: Any = None,
) -> RunResult:
    """Run ``job`` to the end. ``extra_plugins`` adds plugins by name without installing them.

    With ``resume`` the run continues the run directory ``out`` from its last committed
    round. ``runtime`` replaces the one the chain's ``get_runtime`` picks (``flcore
    server`` passes its network runtime this way).

    Raises :class:`flcore.training.RunFailed` when a round fails under the ``abort`` policy,
    or the run directory cannot be written (a full disk), after the run directory holds the
    last completed round; ``summary.json`` then says why and which round that is.
    """
    training = prepare(job, extra_plugins)
    if runtime is not None:
        training.runtime = runtime
    if resume:
        if out is None:
            raise FLCoreError("resume needs the run directory")
        run_dir = Path(out).resolve()
        resume_job(run_dir, job)
    else:
        run_dir = new_run_dir(job, out)
    log = make_logger(
        run_dir / "events.jsonl",
        console_format="json" if console == "json" else "console",
        console_level="info" if console == "json" else console_level,
    )
    try:
        for warning in job.warnings:
            log.warning("job_warning", message=warning)
        if not resume:
            _write(run_dir / "job.toml", job.to_toml())
        training.run_dir = run_dir
        training.ctx.run_dir = run_dir
        training.ctx.log = log.bind(job=job.job.name)
        training.ctx.console = console
        try:
            training.run(resume=resume)
        except FLCoreError as err:
            if not isinstance(err, ResumeRefused):  # a refused resume leaves the run as it was
                _write_failure_summary(training, err)
            raise
        result = RunResult(run_dir, training.history)
        _write(run_dir / SUMMARY, _summary(training, training.completed_round))
        return result
    finally:
        close_logger(log)


def _summary(training: Training, rounds: int, failed: Exception | None = None) -> str:
    """``summary.json``: the last completed round, its metrics and, for a run that
    stopped, why."""
    done = [m for m in training.history if m.get("round", 0) <= rounds]
    summary: dict[str, Any] = {
        "run_dir": str(training.run_dir),
        "rounds": rounds,
        "final": done[-1] if done else {},
    }
    if failed is not None:
        summary["failed"] = str(failed)
    return json.dumps(summary, indent=2, default=str) + "\n"


def _write_failure_summary(training: Training, err: Exception) -> None:
    """Best effort: the disk that stopped the run may have no room for it either."""
    assert training.run_dir is not None
    with contextlib.suppress(StorageError):
        _write(training.run_dir / SUMMARY, _summary(training, training.saved_round, err))
