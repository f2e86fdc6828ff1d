"""One training run: its context, runtime, run directory, error policy and checkpoints.

The round's state machine is :class:`flcore.trainer.ModelTrainer`, whose class the chain
answers (``get_trainer_class``). This module uses the trainer; the trainer knows this one
only as a type, so the loop's two modules do not import each other.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from flcore import codec
from flcore.chain import Chain
from flcore.context import ServerContext
from flcore.data import seed_torch
from flcore.durable import Data, DurableWriter, StorageError, append_to
from flcore.errors import CodecError, FLCoreError, HandlerFailed, JobError, RoundFailed
from flcore.job import Job
from flcore.logging import check_log_file
from flcore.runtime.base import ClientResult
from flcore.task import Task
from flcore.trainer import ModelTrainer, process_trainer_task

GLOBAL_MODEL = "global_model.safetensors"
CHECKPOINT = "checkpoint.json"
METRICS = "metrics.jsonl"
#: Where the tensors of the plugins' saved state go, one file per committed round.
STATE_DIR = "plugin_state"
#: The temporary files that :func:`flcore.codec.write_atomic` writes through
#: (``.NAME.XXXXXXXX.tmp``, from ``tempfile.mkstemp``): a killed write leaves one behind.
TEMP_FILE = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


class RunFailed(FLCoreError):
    """The run stopped; the message says why and what was kept."""


class ResumeRefused(FLCoreError):
    """The run directory cannot be continued as the run it was: the message says why."""


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
        #: The last round whose files are known to be on disk: what a resume continues.
        self.saved_round = 0
        #: The round whose files the writer holds, until they are known to be on disk.
        self._in_flight: int | None = None
        #: ``{"round", "sha256"}`` of the last global model handed to the writer: the next
        #: checkpoint names it too (:meth:`_write_round`).
        self._last_model: dict[str, Any] | None = None
        #: Failed attempts of the round in progress (reset when a round commits).
        self.attempts = 0

    @property
    def run_id(self) -> str:
        """The run's name, sent with each training request: a deployed client keeps its
        state in a folder of that name, so a resumed run finds it and a new run does not."""
        return self.run_dir.name if self.run_dir is not None else "memory"

    @functools.cached_property
    def job_digest(self) -> str:
        """The sha256 of the resolved job (``job.toml``): a resume of an edited one is refused."""
        return hashlib.sha256(self.job.to_toml().encode()).hexdigest()

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
                    self._write_round({"round": 0, "job": self.job.job.name, "state": {}}, [])
                    self._wait_for_disk()
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
                self._wait_for_disk(close=True)  # the last round's files are on disk
        self._check_log()  # the events of the last round and of shutdown were written too

    def _guard(self, step: Any, stage: str) -> None:
        """Run ``step``; when it fails in a round, roll the round back and follow the policy:
        stop, or try the round again up to ``[job] max_retries`` times in all. When writing
        the run directory failed, stop whatever the policy: a retry would only fill it."""
        try:
            step()
        except Exception as err:
            storage = _storage_error(err, self.run_dir)
            if storage is not None:
                self._stop(storage)
            if stage != "round" and not isinstance(err, RoundFailed):
                raise
            failure = err if isinstance(err, RoundFailed) else _unexpected(err)
            self._fail_round(failure)

    def _roll_back(self) -> None:
        """Undo the round in progress, if one is: the chain's ``rollback``, then its snapshot."""
        if self.trainer is not None and self.trainer.snapshot is not None:
            self.ctx._chain.roll_back_round(self.ctx)
            self.trainer.restore_snapshot()

    def _stop(self, err: StorageError) -> NoReturn:
        """The run directory cannot be written (a full disk): roll back and stop, leaving
        the last round on disk for a resume."""
        self._roll_back()
        with contextlib.suppress(FLCoreError):  # the first failure is the one to report
            self._wait_for_disk()
        # info: the RunFailed's message is the one line the user sees
        self.ctx.log.info("run_dir_write_failed", path=str(err.path), error=str(err))
        raise RunFailed(self.storage_message(err)) from err

    def storage_message(self, err: StorageError) -> str:
        """The one line a run stops with when its directory cannot be written."""
        where = self.run_dir or err.path.parent
        return (
            f"{err}. The run stopped with round {self.saved_round} complete in {where}; "
            f"make room, then continue it with --resume {where}"
        )

    def _check_log(self) -> None:
        """Stop the run if ``events.jsonl`` could not be written (its logger keeps going)."""
        try:
            check_log_file(self.ctx.log)
        except StorageError as err:
            raise RunFailed(self.storage_message(err)) from err

    def _fail_round(self, err: RoundFailed) -> None:
        ctx = self.ctx
        failed_round = ctx.round
        self._roll_back()
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
        """The round is complete: write its metrics line, the global model and the checkpoint.

        The round counts as committed once its metrics line is written and its files are
        handed to the writer; a full disk found before that (the previous round's files,
        ``events.jsonl``, this line) fails it uncommitted."""
        ctx = self.ctx
        line = dict(ctx.metrics)
        if self.run_dir is None:
            self._committed(line)
            return
        # The plugins' state first: a save_state that fails fails the round, uncommitted.
        state, tensors = self.plugin_state()
        self._wait_for_disk()
        check_log_file(ctx.log)
        append_to(self.run_dir / METRICS, (json.dumps(line, default=str) + "\n").encode())
        # The global model's file is the checkpoint: the round and the plugins' saved state
        # travel in its metadata, so one atomic rename commits them together. Tensors of the
        # plugins' state go to a file of the round's own, written before it.
        meta: dict[str, Any] = {"round": ctx.round, "job": self.job.job.name, "state": state}
        files: list[tuple[Path, Data]] = []
        if tensors:
            name = f"{STATE_DIR}/{ctx.round:04d}.safetensors"
            meta["state_tensors"] = name
            files.append((self.run_dir / name, codec.encode(tensors, {"round": ctx.round})))
        self._write_round(meta, files, keep_copy=self.job.job.keep_round_models)
        self._committed(line)
        self._prune_state_files(ctx.round)

    def _write_round(
        self, meta: dict[str, Any], files: list[tuple[Path, Data]], keep_copy: bool = False
    ) -> None:
        """Hand ``files``, the checkpoint and the global model (with ``meta``) to the writer.

        The model goes last: its rename commits the round. ``checkpoint.json`` goes just
        before it and gives the digests of this model and of the previous one, so whichever
        of the two a crash leaves on disk, a resume can check the model's bytes."""
        assert self.run_dir is not None
        round_ = self.ctx.round
        # Serialized now (plugins may edit the model later), written durably in the background.
        model = codec.encode(self.ctx.global_model, meta)
        if keep_copy:
            files.append((self.run_dir / "rounds" / f"{round_:04d}" / GLOBAL_MODEL, model))
        files.append(
            (self.run_dir / CHECKPOINT, functools.partial(self._checkpoint, round_, model))
        )
        files.append((self.run_dir / GLOBAL_MODEL, model))
        self.writer.submit(files)
        self._in_flight = round_

    def _checkpoint(self, round_: int, model: bytes | bytearray) -> bytes:
        """``checkpoint.json`` of ``round_`` (made on the writer's thread, which writes the
        batches in order: hashing a large model takes milliseconds)."""
        digest = hashlib.sha256(model).hexdigest()
        checkpoint = {
            "round": round_,
            "rounds": self.job.job.rounds,
            "global_model": GLOBAL_MODEL,
            "sha256": digest,
            "previous": self._last_model,
            "job_sha256": self.job_digest,
            "time": time.time(),
        }
        self._last_model = {"round": round_, "sha256": digest}
        return json.dumps(checkpoint, indent=2).encode()

    def _wait_for_disk(self, close: bool = False) -> None:
        """Wait for the files in flight (and with ``close`` stop the writer): from then on
        their round is the one a resume continues. A full disk found at the end of the run
        stops it like one found at a commit."""
        round_, self._in_flight = self._in_flight, None
        try:
            if close:
                self.writer.close()
            else:
                self.writer.wait()
        except StorageError as err:
            if not close:
                raise
            raise RunFailed(self.storage_message(err)) from err
        if round_ is not None:
            self.saved_round = round_

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
        self._wait_for_disk()  # the committed model may still be on its way to disk
        path = self.run_dir / GLOBAL_MODEL
        weights, meta = codec.load_file(path)
        if meta.get("round") != round_:
            raise RoundFailed(
                f"the global model was edited in place during round {round_ + 1} and "
                f"{path} holds round {meta.get('round')}, not {round_}: cannot restore it"
            )
        self.ctx.log.warning("global_model_reloaded", round=round_, reason="edited in place")
        return weights

    def load_checkpoint(self) -> dict[str, Any] | None:
        """Put the run back at its last committed round; return the plugins' saved state,
        or None when not even round 0 was committed (the run starts from the beginning).

        ``global_model.safetensors`` holds the round, the weights and the plugins' state of
        the last committed round (written atomically); ``checkpoint.json`` vouches for its
        bytes and for the job (:meth:`_check_digest`, :meth:`_check_job`). ``metrics.jsonl``
        is cut back to that round (a crash may have come between its line and the model),
        and what killed writes left behind is cleared away: a torn last line, temporary files.
        """
        if self.run_dir is None:
            raise FLCoreError("a run can only be resumed from a run directory")
        self._remove_temp_files()
        checkpoint = self._read_checkpoint()
        self._check_job(checkpoint)
        payload = self._read_model(checkpoint)
        if payload is None:
            self.ctx.log.info("resume_from_start", reason=f"no {GLOBAL_MODEL} was committed")
            self.history = self._cut_metrics(0)
            return None
        try:
            weights, meta = codec.decode(payload, what=str(self.run_dir / GLOBAL_MODEL))
        except CodecError as err:
            raise self._refusal(str(err)) from err
        round_, state = meta.get("round"), meta.get("state", {})
        if not isinstance(round_, int) or round_ < 0 or not isinstance(state, dict):
            raise self._refusal(f"{GLOBAL_MODEL} has no checkpoint")
        self._check_digest(checkpoint, payload, round_)
        state = self._load_plugin_state(state, meta.get("state_tensors"), round_)
        self._check_model(weights, meta, round_)
        self.ctx.global_model = weights
        self.ctx.round = self.completed_round = self.saved_round = round_
        self._last_model = {"round": round_, "sha256": hashlib.sha256(payload).hexdigest()}
        self.history = self._cut_metrics(round_)
        return state

    def _refusal(self, why: str) -> ResumeRefused:
        return ResumeRefused(f"cannot resume {self.run_dir}: {why}")

    def _read_model(self, checkpoint: dict[str, Any] | None) -> bytes | None:
        """The bytes of the global model; None when there is none and ``checkpoint`` says
        no round was committed (a full disk or a crash before round 0 was written)."""
        assert self.run_dir is not None
        try:
            return (self.run_dir / GLOBAL_MODEL).read_bytes()
        except FileNotFoundError:
            if checkpoint is None or checkpoint.get("round") == 0:
                return None
            raise self._refusal(
                f"it has no {GLOBAL_MODEL}, though {CHECKPOINT} is at round "
                f"{checkpoint.get('round')!r}"
            ) from None
        except OSError as err:
            raise self._refusal(f"cannot read {GLOBAL_MODEL}: {err.strerror}") from err

    def _check_model(
        self, weights: dict[str, torch.Tensor], meta: dict[str, Any], round_: int
    ) -> None:
        """Refuse a model of another job, of a finished run, or of another task."""
        if meta.get("job") != self.job.job.name:
            raise self._refusal(f"it holds job {meta.get('job')!r}, not {self.job.job.name!r}")
        if round_ >= self.job.job.rounds:
            raise self._refusal(f"all {self.job.job.rounds} rounds are done")
        reference = self.initial_model()
        if set(weights) != set(reference) or any(
            weights[k].shape != v.shape or weights[k].dtype != v.dtype for k, v in reference.items()
        ):
            raise self._refusal(f"{GLOBAL_MODEL} is not this task's model")

    def _check_job(self, checkpoint: dict[str, Any] | None) -> None:
        """Refuse a job other than the one the run was started with (``job.toml`` edited)."""
        recorded = checkpoint.get("job_sha256") if checkpoint is not None else None
        if recorded is not None and recorded != self.job_digest:
            raise self._refusal(
                "its job.toml differs from the job the run was started with (edited since?); "
                "restore it, or start a new run"
            )

    def _check_digest(self, checkpoint: dict[str, Any] | None, payload: bytes, round_: int) -> None:
        """Refuse a model whose bytes ``checkpoint.json`` does not vouch for (a flipped bit,
        a file from another run).

        ``checkpoint.json`` is written just before the model and names this model's digest
        and the previous one's, so after a crash between the two it is one round ahead and
        its ``previous`` matches. One that is behind the model (only older flcore wrote the
        model first) vouches for nothing, and says so in the log."""
        if checkpoint is None:
            if round_ > 0:
                raise self._refusal(f"it has no {CHECKPOINT}, so {GLOBAL_MODEL} cannot be checked")
            return
        digest = hashlib.sha256(payload).hexdigest()
        ahead, previous = checkpoint, checkpoint.get("previous")
        vouched = [e for e in (ahead, previous) if isinstance(e, dict) and "sha256" in e]
        log = self.ctx.log
        if not vouched:  # written by an older flcore
            log.warning("checkpoint_unverified", reason=f"{CHECKPOINT} holds no digests")
        elif any(e["sha256"] == digest and e.get("round") == round_ for e in vouched):
            if ahead.get("round") != round_:
                log.info("checkpoint_ahead", round=round_, checkpoint_round=ahead.get("round"))
        elif isinstance(ahead.get("round"), int) and ahead["round"] < round_:
            log.warning("checkpoint_behind", round=round_, checkpoint_round=ahead["round"])
        else:
            raise self._refusal(
                f"{GLOBAL_MODEL} (round {round_}, sha256 {digest[:12]}...) is not the model "
                f"{CHECKPOINT} records: its bytes changed after they were written"
            )

    def _read_checkpoint(self) -> dict[str, Any] | None:
        assert self.run_dir is not None
        path = self.run_dir / CHECKPOINT
        try:
            checkpoint = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except OSError as err:
            raise self._refusal(f"cannot read {CHECKPOINT}: {err.strerror}") from err
        except (ValueError, RecursionError):
            checkpoint = None
        if not isinstance(checkpoint, dict):
            raise self._refusal(f"{CHECKPOINT} is not a JSON object")
        return checkpoint

    def _cut_metrics(self, round_: int) -> list[dict[str, Any]]:
        """The metrics lines of rounds up to ``round_``, and ``metrics.jsonl`` cut back to them.
        A last line that is not JSON is what a write torn by a crash left: dropped, logged."""
        assert self.run_dir is not None
        path = self.run_dir / METRICS
        if not path.exists():
            return []
        lines = [(n, raw) for n, raw in enumerate(path.read_bytes().split(b"\n"), 1) if raw.strip()]
        history: list[dict[str, Any]] = []
        kept: list[bytes] = []
        for number, raw in lines:
            line = _metrics_line(raw)
            if line is None and number == lines[-1][0]:
                self.ctx.log.warning("metrics_line_dropped", line=number, reason="torn")
            elif line is None:
                raise self._refusal(f"{METRICS} line {number} is not a JSON object with a round")
            elif line["round"] <= round_:
                history.append(line)
                kept.append(raw + b"\n")
        try:
            codec.write_atomic(path, b"".join(kept))
        except OSError as err:
            raise StorageError(path, err) from err
        return history

    def _remove_temp_files(self) -> None:
        """Remove the temporary files that killed writes left in the run directory (each as
        large as the file it was writing); they are never read."""
        assert self.run_dir is not None
        removed: list[str] = []
        for folder, _, names in os.walk(self.run_dir):
            for name in names:
                if TEMP_FILE.fullmatch(name):
                    path = Path(folder, name)
                    try:
                        path.unlink(missing_ok=True)
                    except OSError as err:
                        raise StorageError(path, err) from err
                    removed.append(str(path.relative_to(self.run_dir)))
        if removed:
            self.ctx.log.info("temp_files_removed", files=sorted(removed))

    def _load_plugin_state(self, state: dict[str, Any], tensors_file: Any, round_: int) -> Any:
        """The plugins' saved state of ``round_``, its tensors read from their own file."""
        from flcore import saved_state

        assert self.run_dir is not None
        tensors: dict[str, torch.Tensor] = {}
        if tensors_file is not None:
            expected = f"{STATE_DIR}/{round_:04d}.safetensors"
            if tensors_file != expected:  # never a path a file chose: only the round's own
                raise self._refusal(
                    f"{GLOBAL_MODEL} names state tensors {tensors_file!r}, not {expected!r}"
                )
            try:
                tensors, _ = codec.load_file(self.run_dir / expected)
            except (CodecError, OSError) as err:
                raise self._refusal(f"{expected}: {err}") from err
        try:
            value = saved_state.unpack(state, tensors)
        except CodecError as err:
            raise self._refusal(f"the plugins' state: {err}") from err
        return value

    def save_local_model(self, round: int | None, client: str, weights: Any) -> None:
        """Keep a client's model (``delete_local_models_after_aggregation = false``)."""
        if self.run_dir is None:
            return
        folder = self.run_dir / "rounds" / f"{round:04d}" if round else self.run_dir / "best_local"
        codec.save_file(
            folder / f"{client}.safetensors", weights, {"round": round, "client_id": client}
        )


def _metrics_line(raw: bytes) -> dict[str, Any] | None:
    """One line of ``metrics.jsonl``, or None when it is no JSON object with an int round."""
    try:
        line = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    ok = isinstance(line, dict) and isinstance(line.get("round"), int)
    return line if ok else None


#: The errors of a disk that takes no more writes (full, over quota, read-only, failing).
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


def _storage_error(err: BaseException, run_dir: Path | None) -> StorageError | None:
    """``err`` as a :class:`StorageError` when writing the run directory caused it: one the
    core raised, or a plugin's write into the run directory that the disk refused."""
    cause: BaseException | None = err
    for _ in range(8):  # err, the plugin's error it wraps, their causes
        if cause is None:
            return None
        if isinstance(cause, StorageError):
            return cause
        if (
            isinstance(cause, OSError)
            and cause.errno in _DISK_ERRORS
            and _inside(cause.filename, run_dir)
        ):
            return StorageError(cause.filename, cause)
        cause = cause.error if isinstance(cause, HandlerFailed) else cause.__cause__
    return None


def _inside(filename: Any, run_dir: Path | None) -> bool:
    if run_dir is None or not isinstance(filename, str):
        return False
    return Path(filename).resolve().is_relative_to(run_dir.resolve())


def _unexpected(err: Exception) -> RoundFailed:
    """A failure that is no flcore error (a trainer subclass's bug, a runtime's crash), as a
    round failure that names it: the round is rolled back like any other."""
    failed = RoundFailed(f"{type(err).__name__}: {err}")
    failed.__cause__ = err
    return failed
