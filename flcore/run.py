"""``flcore run`` as a function: load the chain and the task, check, train, write the run directory."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from flcore.chain import Chain
from flcore.errors import FLCoreError
from flcore.job import Job
from flcore.logging import close_logger, make_logger
from flcore.task import load_task
from flcore.training import GLOBAL_MODEL, Training


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
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def resume_job(run_dir: str | Path, job: Job | None = None) -> Job:
    """The job of the run in ``run_dir``; a ``job`` given as well must be the same job
    (anything else would not continue the run to the weights it was heading for)."""
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
    after the run directory holds the last completed round.
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
            (run_dir / "job.toml").write_text(job.to_toml(), encoding="utf-8")
        training.run_dir = run_dir
        training.ctx.run_dir = run_dir
        training.ctx.log = log.bind(job=job.job.name)
        training.ctx.console = console
        training.run(resume=resume)
        result = RunResult(run_dir, training.history)
        summary = {
            "run_dir": str(run_dir),
            "rounds": training.completed_round,
            "final": result.final_metrics,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        return result
    finally:
        close_logger(log)
