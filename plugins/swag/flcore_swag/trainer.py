"""``SWAGModelTrainer``: the DLR demonstrator's SWAG trainer, after the training rounds.

When the last training round is committed, the trainer runs ``[plugins.swag] rounds`` SWAG
rounds instead of finishing: ``start_swag_round`` fires, every client collects SWAG moments
from the global model, ``SWAGRoundFinished`` is dispatched and its ``handle`` moment-matches
the accepted moments into the posterior (then the BatchNorm pass, when the model has
BatchNorm), ``end_swag_round`` fires, and the posterior is written to the run directory. A
SWAG round never changes the global model. Its state lives in ``ctx.state["swag"]``, so a
failed SWAG round is rolled back like any other.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import attrs

from flcore import (
    CodecError,
    ContributionRefused,
    ModelTrainer,
    ModelTrainerEvent,
    RoundFailed,
    derive_seed,
    encode_tensors,
)
from flcore_swag import batchnorm, collect
from flcore_swag.aggregation import moment_match
from flcore_swag.moments import ClientMoments, check_moments
from flcore_swag.posterior import Posterior
from flcore_swag.settings import Settings

if TYPE_CHECKING:
    from flcore import ServerContext

STATE = "swag"


def swag_settings(ctx: ServerContext) -> Settings:
    """The settings of the chain's SWAG plugin, whatever name the chain gives it (the
    trainer is no plugin: it finds them among the job's validated sections)."""
    for name in ctx.job.chain:
        settings = ctx.settings(name)
        if isinstance(settings, Settings):
            return settings
    return Settings()


def swag_state(ctx: ServerContext) -> dict[str, Any]:
    """``completed`` SWAG rounds, the ``posterior`` so far and its total ``weight``."""
    return ctx.state.setdefault(STATE, {"completed": 0, "posterior": None, "weight": 0.0})


class SWAGRoundFinished(ModelTrainerEvent):
    """Every client answered the SWAG round: aggregate the moments, then end the round."""

    def handle(self) -> None:
        assert isinstance(self.trainer, SWAGModelTrainer)
        self.trainer.aggregate_moments()

    def next(self) -> None:
        assert isinstance(self.trainer, SWAGModelTrainer)
        self.trainer.end_swag_round()


class SWAGModelTrainer(ModelTrainer):
    """A :class:`~flcore.ModelTrainer` that ends a training with SWAG rounds."""

    @property
    def settings(self) -> Settings:
        return swag_settings(self.ctx)

    def start_round(self) -> None:
        # After the training rounds (e.g. a retried SWAG round), a round is a SWAG round.
        if self.ctx.round >= self.ctx.job.job.rounds:
            self.start_swag_round()
        else:
            super().start_round()

    def finish(self) -> None:
        if swag_state(self.ctx)["completed"] < self.settings.rounds:
            self.start_swag_round()
        else:
            super().finish()

    # -- a SWAG round -----------------------------------------------------------------

    def start_swag_round(self) -> None:
        """Begin the round (snapshot, round count, timer), fire ``start_swag_round``, collect
        the moments of every client: a SWAG round samples no cohort."""
        ctx = self.ctx
        self.begin_round()
        ctx.cohort = ctx.clients
        state = swag_state(ctx)
        swag_round = state["completed"] + 1
        ctx.metrics["swag_round"] = swag_round
        ctx.fire("start_swag_round", swag_round=swag_round)
        state["pending"] = self.collect_moments()
        self.dispatch(SWAGRoundFinished)

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        model = self.ctx.task.model()
        return {name: tuple(p.shape) for name, p in model.named_parameters()}

    def collect_moments(self) -> list[ClientMoments]:
        """Send the global model with a ``swag_collect`` request; keep the moments that pass
        validation and the chain's ``receive_swag_moments``; log the refused with a reason."""
        ctx = self.ctx
        payload = encode_tensors(ctx.global_model, {"kind": collect.REQUEST, "round": ctx.round})
        shapes = self.parameter_shapes()
        received: set[str] = set()
        accepted: list[ClientMoments] = []
        refused: dict[str, str] = {}
        for result in ctx.send_to_clients(collect.REQUEST, payload, ctx.clients):
            try:
                if result.payload is None:
                    raise ContributionRefused(f"{result.client_id}: client failed: {result.error}")
                moments = ClientMoments.decode(result.payload, sender=result.client_id)
                check_moments(
                    moments,
                    sender=result.client_id,
                    shapes=shapes,
                    round=ctx.round,
                    clients=frozenset(ctx.clients),
                    received=received,
                    max_rank=self.settings.rank,
                )
                for plugin, answer in ctx.fire("receive_swag_moments", moments=moments):
                    if answer is False or isinstance(answer, str):
                        reason = answer if isinstance(answer, str) else "refused"
                        raise ContributionRefused(f"{moments.client_id}: {plugin}: {reason}")
            except (ContributionRefused, CodecError) as err:
                refused[result.client_id] = str(err)
                ctx.log.warning(
                    "swag_moments_refused",
                    client=result.client_id,
                    round=ctx.round,
                    reason=str(err),
                )
                continue
            received.add(moments.client_id)
            accepted.append(moments)
        # Replies arrive in any order; aggregating in client order gives every runtime the
        # same float sums, hence byte-identical posteriors.
        order = {name: i for i, name in enumerate(ctx.clients)}
        accepted.sort(key=lambda m: order[m.client_id])
        ctx.metrics["clients"] = [m.client_id for m in accepted]
        if refused:
            ctx.metrics["refused"] = refused
        return accepted

    def aggregate_moments(self) -> None:
        """Moment-match the accepted moments, pool them with the earlier SWAG rounds', run
        the BatchNorm pass, and fire ``after_swag_aggregation``."""
        ctx = self.ctx
        settings = self.settings
        state = swag_state(ctx)
        accepted: list[ClientMoments] = state.pop("pending", [])
        needed = ctx.job.job.required_clients(len(ctx.clients))
        if len(accepted) < needed:
            raise RoundFailed(
                f"SWAG round {state['completed'] + 1}: {len(accepted)} of "
                f"{len(ctx.clients)} clients' moments accepted, {needed} needed "
                f"([job] min_clients); refused: {ctx.metrics.get('refused', {})}"
            )
        components = [(m.gaussian, m.weight(settings.weight_by)) for m in accepted]
        weight = math.fsum(w for _, w in components)
        gaussian = moment_match(components, settings.rank, settings.var_clamp)
        round_metrics = _describe(components, gaussian)
        if state["posterior"] is not None:
            earlier = state["posterior"].gaussian
            gaussian = moment_match(
                [(earlier, state["weight"]), (gaussian, weight)],
                settings.rank,
                settings.var_clamp,
            )
            weight += state["weight"]
        snapshots = sum(m.num_snapshots for m in accepted)
        info = dict(state["posterior"].info) if state["posterior"] is not None else {}
        posterior = Posterior(
            gaussian=gaussian,
            scale=settings.scale,
            samples=settings.samples,
            sample_seed=derive_seed(ctx.job.job.seed, "swag-samples"),
            var_clamp=settings.var_clamp,
            info={
                "job": ctx.job.job.name,
                "training_rounds": ctx.job.job.rounds,
                "swag_rounds": state["completed"] + 1,
                "clients": sorted(set(info.get("clients", [])) | {m.client_id for m in accepted}),
                "snapshots": info.get("snapshots", 0) + snapshots,
                "weight_by": settings.weight_by,
                "total_weight": weight,
            },
        )
        if settings.bn_update:
            posterior = self.batchnorm_pass(posterior)
        state["posterior"], state["weight"] = posterior, weight
        ctx.metrics["swag"] = {
            "snapshots": snapshots,
            "rank": posterior.rank,
            **round_metrics,
            "batchnorm_samples": len(posterior.batchnorm),
        }
        ctx.fire("after_swag_aggregation", posterior=posterior)

    def batchnorm_pass(self, posterior: Posterior) -> Posterior:
        """Per-sample BatchNorm statistics from the clients, pooled; the posterior unchanged
        when the model has no BatchNorm."""
        ctx = self.ctx
        model = ctx.task.model()
        names = batchnorm.statistic_names(model)
        if not names:
            return posterior
        buffers = dict(model.named_buffers())
        shapes = {n: tuple(buffers[n].shape) for n in names}
        payload = batchnorm.request_payload(posterior, ctx.global_model, ctx.round)
        answers = {}
        clients = ctx.metrics["clients"]
        for result in ctx.send_to_clients(batchnorm.REQUEST, payload, clients):
            try:
                if result.payload is None:
                    raise CodecError(f"client failed: {result.error}")
                if result.client_id not in clients or result.client_id in answers:
                    raise CodecError("not asked, or answered twice")
                answers[result.client_id] = batchnorm.read_answer(
                    result.payload,
                    result.client_id,
                    round=ctx.round,
                    samples=posterior.samples,
                    shapes=shapes,
                )
            except CodecError as err:
                ctx.metrics.setdefault("refused", {})[result.client_id] = str(err)
                ctx.log.warning(
                    "swag_batchnorm_refused",
                    client=result.client_id,
                    round=ctx.round,
                    reason=str(err),
                )
        if not answers:
            raise RoundFailed(f"round {ctx.round}: no client returned BatchNorm statistics")
        dtypes = {n: buffers[n].dtype for n in names}
        in_order = [answers[c] for c in clients if c in answers]  # client order, as above
        return attrs.evolve(posterior, batchnorm=tuple(batchnorm.pool(in_order, dtypes)))

    def end_swag_round(self) -> None:
        """Fire ``end_swag_round``, write the posterior, commit, then go on or finish."""
        ctx = self.ctx
        state = swag_state(ctx)
        ctx.metrics["round"] = ctx.round
        ctx.metrics["seconds"] = round(time.perf_counter() - self.round_started, 4)
        ctx.fire("end_swag_round")
        state["completed"] += 1
        if ctx.run_dir is not None:
            state["posterior"].save(ctx.run_dir)
        self.commit_round()
        self.finish()


def _describe(components: list[tuple[Any, float]], gaussian: Any) -> dict[str, float]:
    """How wide the round's posterior is, and how much of its variance is the clients'
    disagreement (the spread of their means) rather than their own SGD noise."""
    total_weight = math.fsum(w for _, w in components)
    within = sum(
        float(sum((w / total_weight) * g.var[n].sum() for g, w in components))
        for n in gaussian.names
    )
    total = sum(float(gaussian.var[n].sum()) for n in gaussian.names)
    return {
        "mean_std": sum(float(gaussian.var[n].sqrt().sum()) for n in gaussian.names)
        / gaussian.numel,
        "between_client_share": max(0.0, 1.0 - within / total) if total > 0 else 0.0,
    }
