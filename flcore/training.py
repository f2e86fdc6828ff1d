"""One training run: its context, runtime, run directory, error policy and checkpoints.

The round's state machine is :class:`flcore.trainer.ModelTrainer`, whose class the chain
answers (``get_trainer_class``). This module uses the trainer; the trainer knows this one
only as a type, so the loop's two modules do not import each other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from flcore import codec
from flcore.chain import Chain
from flcore.context import ServerContext
from flcore.data import seed_torch
from flcore.durable import DurableWriter
from flcore.errors import CodecError, FLCoreError, HandlerFailed, JobError, RoundFailed
from flcore.job import Job
from flcore.runtime.base import ClientResult
from flcore.task import Task
from flcore.trainer import ModelTrainer, process_trainer_task

GLOBAL_MODEL = "global_model.safetensors"
CHECKPOINT = "checkpoint.json"
METRICS = "metrics.jsonl"
#: Where the tensors of the plugins' saved state go, one file per committed round.
STATE_DIR = "plugin_state"


class RunFailed(FLCoreError):
    """The run stopped; the message says why and what was kept."""


class Training:
    """Everything one run needs; one :class:`~flcore.trainer.ModelTrainer` runs its rounds."""

    def __init__(self, job: Job, chain: Chain, task: Task, run_dir: Path | None, log: Any) -> None:
        self.job = job
        self.chain = chain
        self.options = job.trainer
        self.run_dir = run_dir
        self.ctx = ServerContext(
            job=job,
            task=task,
            chain=chain,
            log=log,
            run_dir=run_dir,
            training=self,
            clients=job.client_names,
        )
        self.completed_round = 0
        self.finished = False
        self.history: list[dict[str, Any]] = []
        self.runtime: Any = None
        self.trainer: ModelTrainer | None = None
        self.trainer_cls: type[ModelTrainer] = ModelTrainer
        self.writer = DurableWriter()
        #: Failed attempts of the round in progress (reset when a round commits).
        self.attempts = 0

    @property
    def run_id(self) -> str:
        """The run's name, sent with each training request: a deployed client keeps its
        state in a folder of that name, so a resumed run finds it and a new run does not."""
        return self.run_dir.name if self.run_dir is not None else "memory"

    @property
    def clients(self) -> list[str]:
        """The federation's members, in client order."""
        return list(self.ctx.clients)

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
        self.trainer_cls = self.trainer_class()

    def trainer_class(self) -> type[ModelTrainer]:
        """The class ``get_trainer_class`` answers (asked once, by :meth:`check`); two
        plugins answering is an error."""
        answers = [(n, a) for n, a in self.ctx._chain.answers("get_trainer_class", self.ctx)]
        mine = [(n, a) for n, a in answers if not n.startswith("core.")]
        if len(mine) > 1:
            raise JobError(
                f"{self.job.where('plugins')}.chain: plugins {mine[0][0]!r} and {mine[1][0]!r} "
                "both answer get_trainer_class; a training has one trainer, so chain only one"
            )
        chosen = (mine or answers or [("", None)])[0][1]
        if not (isinstance(chosen, type) and issubclass(chosen, ModelTrainer)):
            raise JobError(f"get_trainer_class answered {chosen!r}, not a ModelTrainer class")
        return chosen

    def initial_model(self) -> dict[str, torch.Tensor]:
        seed_torch(self.job.job.seed)
        model = self.ctx.task.model()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def run(self, resume: bool = False) -> None:
        """Run every round; raise :class:`RunFailed` when the error policy stops the run.

        With ``resume`` the run continues its run directory from the last committed round
        (see :meth:`load_checkpoint`) instead of starting from the initial model.
        ``shutdown`` fires whenever ``startup`` was fired, also after one that failed.
        """
        ctx = self.ctx
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
            trainer = self.trainer = self.trainer_cls(self, self.options)
            started = True
            self._guard(lambda: ctx.fire("startup"), "startup")
            if saved_state is not None:
                ctx.log.info("run_resumed", round=self.completed_round)
                resumable = {name for name, _ in ctx._chain.implementations("resume")}
                stateless = [n for n in self.job.chain if n not in resumable]
                if stateless:
                    ctx.log.warning(
                        "resume_without_plugin_state",
                        plugins=stateless,
                        message="these plugins implement no resume hook: what they kept "
                        "from earlier rounds starts over",
                    )
                self._guard(lambda: ctx.fire("resume", state=saved_state), "startup")
            ctx.clients = tuple(self.runtime.start(ctx))
            for client in ctx.clients:
                self._guard(lambda c=client: ctx.fire("client_register", client_id=c), "startup")
            self._guard(trainer.start, "round")
            while trainer.queue:
                event = trainer.queue.popleft()
                self._guard(lambda e=event: process_trainer_task(trainer, e), "round")
        finally:
            if self.trainer is not None:
                self.trainer.queue.clear()
            try:
                if started:
                    present = self.runtime.present(ctx.clients) if ctx.clients else []
                    for client in present:
                        self._quietly(lambda c=client: ctx.fire("client_quit", client_id=c))
                    self._quietly(lambda: ctx.fire("shutdown"))
            finally:
                if self.runtime is not None:
                    self.runtime.stop(ctx)
                self.writer.close()  # the last round's files are on disk when run() returns

    def _guard(self, step: Any, stage: str) -> None:
        """Run ``step``; when it fails in a round, roll the round back and follow the policy:
        stop, or try the round again up to ``[job] max_retries`` times in all."""
        try:
            step()
        except Exception as err:
            if stage != "round" and not isinstance(err, RoundFailed):
                raise
            failure = err if isinstance(err, RoundFailed) else _unexpected(err)
            self._fail_round(failure)

    def _fail_round(self, err: RoundFailed) -> None:
        ctx = self.ctx
        failed_round = ctx.round
        if self.trainer is not None and self.trainer.snapshot is not None:
            ctx._chain.roll_back_round(ctx)
            self.trainer.restore_snapshot()
        self.attempts += 1
        ctx.log.error("round_failed", round=failed_round, attempt=self.attempts, error=str(err))
        policy = self.job.job
        if policy.on_error == "retry" and self.attempts <= policy.max_retries:
            ctx.log.warning("round_retry", round=failed_round, attempt=self.attempts + 1)
            assert self.trainer is not None  # a round failed, so the trainer ran it
            self._guard(self.trainer.start_round, "round")
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
            else (
                f"rolled back and tried {self.attempts} time(s) in all "
                f"([job] max_retries = {self.job.job.max_retries}) without success"
            )
        )
        return f"Round {failed_round} failed: {err}. The round was {action}. {kept}"

    def send_to_clients(
        self, request: str, payload: bytes | bytearray, clients: Sequence[str] | None = None
    ) -> Iterator[ClientResult]:
        """Send ``request`` to ``clients`` (default: the round's cohort, else every member)."""
        ctx = self.ctx
        chosen = list(clients) if clients is not None else list(ctx.cohort or ctx.clients)
        unknown = sorted(set(chosen) - set(ctx.clients))
        if unknown:
            raise FLCoreError(f"{request!r} sent to clients not in the federation: {unknown[:5]}")
        return self.runtime.run(ctx, request, payload, chosen)

    def validate_on_clients(
        self, weights: Mapping[str, torch.Tensor], clients: Sequence[str] | None = None
    ) -> dict[str, dict[str, float]]:
        """Have ``clients`` test ``weights`` on their held-out split: client id -> metrics,
        with ``num_samples``. A client that fails or answers badly (a count above ``[job]
        max_samples_per_client``, a metric out of bounds) is logged and left out."""
        from flcore.client import read_validation

        ctx = self.ctx
        payload = codec.encode(weights, {"kind": "validate", "round": ctx.round})
        tests: dict[str, dict[str, float]] = {}
        bound = self.job.job.max_samples_per_client
        for result in self.send_to_clients("validate", payload, clients):
            try:
                if result.payload is None:
                    raise CodecError(f"client failed: {result.error}")
                n, results = read_validation(result.payload, result.client_id, bound)
            except CodecError as err:
                ctx.log.warning("test_result_refused", client=result.client_id, reason=str(err))
                continue
            tests[result.client_id] = {**results.get("global", {}), "num_samples": n}
        return tests

    # -- the run directory ------------------------------------------------------------

    def commit_round(self) -> None:
        """The round is complete: write its metrics line, the global model and the checkpoint."""
        ctx = self.ctx
        line = dict(ctx.metrics)
        if self.run_dir is None:
            self._committed(line)
            return
        # The plugins' state first: a save_state that fails fails the round, uncommitted.
        state, tensors = self.plugin_state()
        self._committed(line)
        with open(self.run_dir / METRICS, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, default=str) + "\n")
        # The global model's file is the checkpoint: the round and the plugins' saved state
        # travel in its metadata, so one atomic rename commits them together. Tensors of the
        # plugins' state go to a file of the round's own, written just before it.
        meta: dict[str, Any] = {"round": ctx.round, "job": self.job.job.name, "state": state}
        files: list[tuple[Path, bytes | bytearray]] = []
        if tensors:
            name = f"{STATE_DIR}/{ctx.round:04d}.safetensors"
            meta["state_tensors"] = name
            files.append((self.run_dir / name, codec.encode(tensors, {"round": ctx.round})))
        # Serialized now (plugins may edit the model later), written durably in the background.
        model = codec.encode(ctx.global_model, meta)
        files.append((self.run_dir / GLOBAL_MODEL, model))
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
        self._prune_state_files(ctx.round)

    def _committed(self, line: dict[str, Any]) -> None:
        self.completed_round = self.ctx.round
        self.attempts = 0
        self.history.append(line)

    def _prune_state_files(self, round_: int) -> None:
        """Keep the plugin-state tensors of this round and the one before (the last one
        surely on disk); older rounds' are never read again."""
        assert self.run_dir is not None
        folder = self.run_dir / STATE_DIR
        if not folder.is_dir():
            return
        for path in folder.glob("*.safetensors"):
            if path.stem.isdigit() and int(path.stem) < round_ - 1:
                path.unlink(missing_ok=True)

    def plugin_state(self) -> tuple[Any, dict[str, torch.Tensor]]:
        """What the chain's ``save_state`` handlers return, by plugin name, as JSON and the
        tensors it holds (:func:`flcore.saved_state.pack`)."""
        from flcore import saved_state

        state: dict[str, Any] = {}
        for plugin, answer in self.ctx.fire("save_state"):
            if answer is None:
                continue
            try:
                saved_state.pack(answer)
            except CodecError as err:
                raise RoundFailed(f"plugin {plugin!r}: save_state returned {err}") from err
            state[plugin] = answer
        return saved_state.pack(state)

    def reload_committed_model(self, round_: int) -> dict[str, torch.Tensor]:
        """The global model of the last committed round, read back from the run directory
        (a plugin edited the in-memory one in place, so a rollback cannot reuse it)."""
        if self.run_dir is None:
            raise RoundFailed("the global model was edited in place and there is no run directory")
        self.writer.wait()  # the committed model may still be on its way to disk
        path = self.run_dir / GLOBAL_MODEL
        weights, meta = codec.load_file(path)
        if meta.get("round") != round_:
            raise RoundFailed(
                f"the global model was edited in place during round {round_ + 1} and "
                f"{path} holds round {meta.get('round')}, not {round_}: cannot restore it"
            )
        self.ctx.log.warning("global_model_reloaded", round=round_, reason="edited in place")
        return weights

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
        state = self._load_plugin_state(state, meta.get("state_tensors"), round_)
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

    def _load_plugin_state(self, state: dict[str, Any], tensors_file: Any, round_: int) -> Any:
        """The plugins' saved state of ``round_``, its tensors read from their own file."""
        from flcore import saved_state

        assert self.run_dir is not None
        tensors: dict[str, torch.Tensor] = {}
        if tensors_file is not None:
            expected = f"{STATE_DIR}/{round_:04d}.safetensors"
            if tensors_file != expected:  # never a path a file chose: only the round's own
                raise FLCoreError(
                    f"cannot resume {self.run_dir}: {GLOBAL_MODEL} names state tensors "
                    f"{tensors_file!r}, not {expected!r}"
                )
            try:
                tensors, _ = codec.load_file(self.run_dir / expected)
            except (CodecError, OSError) as err:
                raise FLCoreError(f"cannot resume {self.run_dir}: {expected}: {err}") from err
        try:
            value = saved_state.unpack(state, tensors)
        except CodecError as err:
            raise FLCoreError(f"cannot resume {self.run_dir}: the plugins' state: {err}") from err
        return value

    def save_local_model(self, round: int | None, client: str, weights: Any) -> None:
        """Keep a client's model (``delete_local_models_after_aggregation = false``)."""
        if self.run_dir is None:
            return
        folder = self.run_dir / "rounds" / f"{round:04d}" if round else self.run_dir / "best_local"
        codec.save_file(
            folder / f"{client}.safetensors", weights, {"round": round, "client_id": client}
        )


def _unexpected(err: Exception) -> RoundFailed:
    """A failure that is no flcore error (a trainer subclass's bug, a runtime's crash), as a
    round failure that names it: the round is rolled back like any other."""
    failed = RoundFailed(f"{type(err).__name__}: {err}")
    failed.__cause__ = err
    return failed
