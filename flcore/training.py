"""One training run: its context, runtime, run directory, event queue and error policy."""

from __future__ import annotations

import json
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, ClassVar

import torch

from flcore import codec
from flcore.chain import Chain
from flcore.context import FLContext
from flcore.data import seed_torch
from flcore.durable import DurableWriter
from flcore.errors import CodecError, FLCoreError, HandlerFailed, JobError, RoundFailed
from flcore.job import Job
from flcore.task import Task

GLOBAL_MODEL = "global_model.safetensors"
CHECKPOINT = "checkpoint.json"
METRICS = "metrics.jsonl"


class RunFailed(FLCoreError):
    """The run stopped; the message says why and what was kept."""


class Training:
    """Everything one run needs; :func:`flcore.trainer.process_trainer_task` finds it by id."""

    registry: ClassVar[dict[str, Training]] = {}

    def __init__(self, job: Job, chain: Chain, task: Task, run_dir: Path | None, log: Any) -> None:
        self.id = str(run_dir) if run_dir is not None else uuid.uuid4().hex
        self.job = job
        self.options = job.trainer
        self.run_dir = run_dir
        self.ctx = FLContext(
            job=job, task=task, chain=chain, log=log, run_dir=run_dir, training=self
        )
        self.queue: deque[Any] = deque()
        self.clients: list[str] = []
        self.round_started = 0.0
        self.completed_round = 0
        self.finished = False
        self.history: list[dict[str, Any]] = []
        self.runtime: Any = None
        self.writer = DurableWriter()
        #: The round's streaming FedAvg, folded while contributions arrive (None: batch).
        self.round_mean: Any = None

    @classmethod
    def get(cls, training_id: str) -> Training:
        try:
            return cls.registry[training_id]
        except KeyError:
            raise FLCoreError(f"no training {training_id!r} in this process") from None

    def dispatch(self, event_cls: Any) -> None:
        self.queue.append(event_cls)

    # -- the run ----------------------------------------------------------------------

    def check(self) -> None:
        """Every check that needs no training: the chain's ``check_job`` and the runtime."""
        try:
            self.ctx.fire("check_job")
        except HandlerFailed as err:
            if isinstance(err.error, JobError):  # a refusal, not a failure: say it plainly
                raise JobError(f"plugin {err.plugin!r} refuses the job: {err.error}") from None
            raise
        self.runtime = self.ctx.ask("get_runtime")
        if self.runtime is None:
            raise JobError(
                f"{self.job.where('job')}.runtime: no plugin provides runtime "
                f"{self.job.job.runtime!r} (the core provides 'embedded')"
            )

    def initial_model(self) -> dict[str, torch.Tensor]:
        seed_torch(self.job.job.seed)
        model = self.ctx.task.model()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def run(self, resume: bool = False) -> None:
        """Run every round; raise :class:`RunFailed` when the error policy stops the run.

        With ``resume`` the run continues its run directory from the last committed round
        (see :meth:`load_checkpoint`) instead of starting from the initial model.
        """
        from flcore.trainer import ModelTrainer, process_trainer_task

        ctx = self.ctx
        self.registry[self.id] = self
        started = False
        try:
            saved_state = self.load_checkpoint() if resume else None
            if saved_state is None:
                ctx.global_model = self.initial_model()
                if self.run_dir is not None:  # round 0: what a rollback of round 1 restores
                    codec.save_file(
                        self.run_dir / GLOBAL_MODEL,
                        ctx.global_model,
                        {"round": 0, "job": self.job.job.name, "state": {}},
                    )
            if self.runtime is None:
                self.check()
            self._guard(lambda: ctx.fire("startup"), "startup")
            started = True
            if saved_state is not None:
                ctx.log.info("run_resumed", round=self.completed_round)
                resumable = {name for name, _ in ctx.chain.implementations("resume")}
                stateless = [n for n in self.job.chain if n not in resumable]
                if stateless:
                    ctx.log.warning(
                        "resume_without_plugin_state",
                        plugins=stateless,
                        message="these plugins implement no resume hook: what they kept "
                        "from earlier rounds starts over",
                    )
                self._guard(lambda: ctx.fire("resume", state=saved_state), "startup")
            self.clients = self.runtime.start(ctx)
            for client in self.clients:
                self._guard(lambda c=client: ctx.fire("client_register", client_id=c), "startup")
            trainer = ModelTrainer(self, self.options)
            self._guard(trainer.start, "round")
            while self.queue:
                event = self.queue.popleft()
                self._guard(lambda e=event: process_trainer_task(self.id, e), "round")
        finally:
            self.queue.clear()
            try:
                if started:
                    for client in self.runtime.present(self.clients):
                        self._quietly(lambda c=client: ctx.fire("client_quit", client_id=c))
                    self._quietly(lambda: ctx.fire("shutdown"))
            finally:
                if self.runtime is not None:
                    self.runtime.stop(ctx)
                self.registry.pop(self.id, None)
                self.writer.close()  # the last round's files are on disk when run() returns

    def _guard(self, step: Any, stage: str, retries: int = 0) -> None:
        try:
            step()
        except RoundFailed as err:
            ctx = self.ctx
            failed_round = ctx.round
            self.queue.clear()
            if stage == "round":
                ctx.restore_snapshot()
            ctx.log.error("round_failed", round=failed_round, error=str(err))
            policy = self.job.job
            if stage == "round" and policy.on_error == "retry" and retries < policy.max_retries:
                from flcore.trainer import ModelTrainer

                ctx.log.warning("round_retry", round=failed_round, attempt=retries + 1)
                self._guard(ModelTrainer(self, self.options).start_round, stage, retries + 1)
                return
            raise RunFailed(self.failure_message(err, failed_round)) from err

    def _quietly(self, step: Any) -> None:
        try:
            step()
        except RoundFailed as err:
            self.ctx.log.error("shutdown_failed", error=str(err))

    def failure_message(self, err: Exception, failed_round: int) -> str:
        kept = (
            f"The last completed round ({self.completed_round}) is kept"
            + (f" in {self.run_dir}" if self.run_dir else "")
            + f" ({GLOBAL_MODEL}, {CHECKPOINT})."
            if self.completed_round
            else "No round had completed; the run directory holds the initial model (round 0)."
        )
        action = (
            "rolled back and the run stopped"
            if self.job.job.on_error == "abort"
            else (f"rolled back and retried {self.job.job.max_retries} time(s) without success")
        )
        return f"Round {failed_round} failed: {err}. The round was {action}. {kept}"

    def validate_on_clients(self, weights: Any) -> dict[str, dict[str, float]]:
        """Have every client test ``weights`` on its held-out split: client id -> metrics,
        with ``num_samples``. A client that fails or answers badly is logged and left out."""
        from flcore.client import read_validation

        ctx = self.ctx
        payload = codec.encode(weights, {"kind": "validate", "round": ctx.round})
        tests: dict[str, dict[str, float]] = {}
        for result in self.runtime.run(ctx, "validate", payload, self.clients):
            try:
                if result.payload is None:
                    raise CodecError(f"client failed: {result.error}")
                n, results = read_validation(result.payload, result.client_id)
            except CodecError as err:
                ctx.log.warning("test_result_refused", client=result.client_id, reason=str(err))
                continue
            tests[result.client_id] = {**results.get("global", {}), "num_samples": n}
        return tests

    # -- the run directory ------------------------------------------------------------

    def commit_round(self) -> None:
        """The round is complete: write its metrics line, the global model and the checkpoint."""
        ctx = self.ctx
        self.completed_round = ctx.round
        ctx.snapshot_ = None  # a committed round is never rolled back
        line = dict(ctx.metrics)
        self.history.append(line)
        if self.run_dir is None:
            return
        with open(self.run_dir / METRICS, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, default=str) + "\n")
        # The global model's file is the checkpoint: the round and the plugins' saved state
        # travel in its metadata, so one atomic rename commits them together.
        meta = {"round": ctx.round, "job": self.job.job.name, "state": self.plugin_state()}
        # Serialized now (plugins may edit the model later), written durably in the background.
        model = codec.encode(ctx.global_model, meta)
        files: list[tuple[Path, bytes | bytearray]] = [(self.run_dir / GLOBAL_MODEL, model)]
        if self.job.job.keep_round_models:
            files.append((self.run_dir / "rounds" / f"{ctx.round:04d}" / GLOBAL_MODEL, model))
        checkpoint = {
            "round": ctx.round,
            "rounds": self.job.job.rounds,
            "global_model": GLOBAL_MODEL,
            "time": time.time(),
        }
        files.append((self.run_dir / CHECKPOINT, json.dumps(checkpoint, indent=2).encode()))
        self.writer.submit(files)

    def plugin_state(self) -> dict[str, Any]:
        """What the chain's ``save_state`` handlers return, by plugin name (JSON only)."""
        state: dict[str, Any] = {}
        for plugin, answer in self.ctx.fire("save_state"):
            if answer is None:
                continue
            try:
                json.dumps(answer, allow_nan=False)
            except (TypeError, ValueError) as err:
                raise RoundFailed(
                    f"plugin {plugin!r}: save_state returned non-JSON: {err}"
                ) from err
            state[plugin] = answer
        return state

    def load_checkpoint(self) -> dict[str, Any]:
        """Put the run back at its last committed round; return the plugins' saved state.

        ``global_model.safetensors`` holds the round, the weights and the plugins' state of
        the last committed round (written atomically); ``metrics.jsonl`` is cut back to it,
        since a crash may have come between its line and the model.
        """
        if self.run_dir is None:
            raise FLCoreError("a run can only be resumed from a run directory")
        path = self.run_dir / GLOBAL_MODEL
        if not path.exists():
            raise FLCoreError(f"cannot resume {self.run_dir}: it has no {GLOBAL_MODEL}")
        try:
            weights, meta = codec.load_file(path)
        except CodecError as err:
            raise FLCoreError(f"cannot resume {self.run_dir}: {err}") from err
        round_, state = meta.get("round"), meta.get("state", {})
        if not isinstance(round_, int) or round_ < 0 or not isinstance(state, dict):
            raise FLCoreError(f"cannot resume {self.run_dir}: {path.name} has no checkpoint")
        if meta.get("job") != self.job.job.name:
            raise FLCoreError(
                f"cannot resume {self.run_dir}: it holds job {meta.get('job')!r}, "
                f"not {self.job.job.name!r}"
            )
        if round_ >= self.job.job.rounds:
            raise FLCoreError(
                f"cannot resume {self.run_dir}: all {self.job.job.rounds} rounds are done"
            )
        reference = self.initial_model()
        if set(weights) != set(reference) or any(
            weights[k].shape != v.shape or weights[k].dtype != v.dtype for k, v in reference.items()
        ):
            raise FLCoreError(f"cannot resume {self.run_dir}: {path.name} is not this task's model")
        self.ctx.global_model = weights
        self.ctx.round = self.completed_round = round_
        self.history = []
        metrics = self.run_dir / METRICS
        if metrics.exists():
            lines = metrics.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if line and json.loads(line).get("round", 0) <= round_]
            self.history = [json.loads(line) for line in kept]
            codec.write_atomic(metrics, "".join(line + "\n" for line in kept).encode())
        return state

    def save_local_model(self, round: int | None, client: str, weights: Any) -> None:
        """Keep a client's model (``delete_local_models_after_aggregation = false``)."""
        if self.run_dir is None:
            return
        folder = self.run_dir / "rounds" / f"{round:04d}" if round else self.run_dir / "best_local"
        codec.save_file(
            folder / f"{client}.safetensors", weights, {"round": round, "client_id": client}
        )
