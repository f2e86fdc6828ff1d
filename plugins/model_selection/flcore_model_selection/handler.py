"""Clara's ModelSelectionHandler: keep the global model that scored best, as it was.

With ``source = "clients"`` a client's ``initial_validation_metric`` scores the global model
it *received*: in round ``r``'s ``before_aggregation`` that is ``ctx.global_model``, the
model round ``r - 1`` produced (the initial model in round 1). Every score is recorded with
the round that produced its model, and since no client ever receives the last round's model,
it gets a client validation of its own after the last round: Clara never scored it, so it
could never be selected.

The selection lives in ``ctx.state["model_selection"]`` (restored by the core on rollback);
the files, which the core cannot restore, are put back by :meth:`rollback`, which a failed
round calls on every plugin that handled any of its events. The next ``start_round`` and
``shutdown`` check that the files agree with the selection all the same.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from flcore import JobError, hookimpl
from flcore_model_selection import hookspecs
from flcore_model_selection.files import BestModelFiles
from flcore_model_selection.record import BestModel
from flcore_model_selection.scoring import (
    ClientScore,
    Score,
    Unusable,
    as_number,
    client_weight,
    is_better,
    read_metric,
    weighted_score,
)
from flcore_model_selection.settings import ModelSelectionSettings

if TYPE_CHECKING:
    import torch

    from flcore import ServerContext

#: The key of this plugin's entries in ``ctx.state`` and ``ctx.metrics``.
PLUGIN_NAME: Final = "model_selection"
#: The entry of ``ctx.metrics`` that the server_validation plugin writes.
SERVER_METRICS: Final = "server"
SERVER_PLUGIN: Final = "server_validation"


def fresh_state() -> dict[str, Any]:
    """The selection before anything was scored (JSON values only: it is deep-copied per round)."""
    return {
        "best": None,  # BestModel.to_json() of the best so far
        "version": 0,  # how many times the best-model files were written
        "scores": {},  # model round (str) -> score, every model scored so far
        "local_iterations": {},  # client -> its last reported count (weighs the final pass)
        "tested_round": None,  # the round whose global model the clients last tested
    }


class ModelSelectionHandler:
    """Scores each global model by the clients' (or the server's) validation and keeps the
    best in ``best_model.safetensors`` with ``best_model.json`` beside it."""

    Settings = ModelSelectionSettings
    flcore_hookspecs = hookspecs

    def __init__(self, settings: ModelSelectionSettings | None = None) -> None:
        self.settings = settings if settings is not None else ModelSelectionSettings()
        self.files = BestModelFiles(None)
        #: The round whose writes :attr:`files` can still undo.
        self._written_in: int | None = None

    # -- before training ------------------------------------------------------------------

    @hookimpl
    def check_job(self, ctx: ServerContext) -> None:
        self._check_weighted_clients(ctx)
        if self.settings.source == "server":
            chain = list(ctx.job.chain)
            me = ctx.name_of(self) or PLUGIN_NAME
            if (
                SERVER_PLUGIN in chain
                and me in chain
                and chain.index(SERVER_PLUGIN) > chain.index(me)
            ):
                raise JobError(
                    f"{ctx.job.where('plugins')}.chain: with [plugins.{me}] source = 'server', "
                    f"{SERVER_PLUGIN!r} must come before {me!r}: it writes the server's "
                    f"metrics in the after_aggregation event that {me!r} reads them in"
                )

    def _check_weighted_clients(self, ctx: ServerContext) -> None:
        """Every name in ``aggregation_weights`` is one of the federation's clients: the job's
        names, known before any client joins on every runtime (``[job] allowed_clients`` in
        a deployment)."""
        clients = ctx.clients
        unknown = sorted(set(self.settings.aggregation_weights) - set(clients))
        if unknown:
            me = ctx.name_of(self) or PLUGIN_NAME
            raise JobError(
                f"{ctx.job.where(f'plugins.{me}')}.aggregation_weights: unknown client "
                f"{unknown[0]!r}; the clients are {', '.join(clients)}"
            )

    # -- the run ----------------------------------------------------------------------------

    @hookimpl
    def startup(self, ctx: ServerContext) -> None:
        ctx.state[PLUGIN_NAME] = fresh_state()
        self.files = BestModelFiles(ctx.run_dir)
        self._written_in = None
        s = self.settings
        ctx.log.info(
            "model_selection_started",
            metric=s.metric_label,
            mode="min" if s.mode == "min" else "max",
            source=s.source,
            weigh_by_local_iter=s.weigh_by_local_iter,
            aggregation_weights=dict(s.aggregation_weights),
        )

    @hookimpl
    def save_state(self, ctx: ServerContext) -> dict[str, Any]:
        """The selection, written with each committed round: a resumed run keeps its best."""
        return copy.deepcopy(ctx.state[PLUGIN_NAME])

    @hookimpl
    def resume(self, ctx: ServerContext, state: Mapping[str, Any]) -> None:
        me = ctx.name_of(self) or PLUGIN_NAME
        saved = state.get(me)
        if saved is not None:
            ctx.state[PLUGIN_NAME] = {**fresh_state(), **copy.deepcopy(dict(saved))}
            ctx.log.info("model_selection_resumed", best=saved.get("best"))

    @hookimpl
    def start_round(self, ctx: ServerContext) -> None:
        self._settle(ctx)

    @hookimpl
    def before_aggregation(self, ctx: ServerContext) -> None:
        if self.settings.source != "clients":
            return
        state = ctx.state[PLUGIN_NAME]
        reports = []
        for c in ctx.contributions:
            state["local_iterations"][c.client_id] = c.local_iterations
            reports.append((c.client_id, c.metrics, c.local_iterations))
        score = self._score_clients(ctx, reports)
        # the clients scored the model they received: the one the previous round produced
        self._consider(ctx, score, model_round=ctx.round - 1, weights=ctx.global_model)

    @hookimpl
    def after_aggregation(self, ctx: ServerContext) -> None:
        if self.settings.source != "server":
            return
        if SERVER_METRICS not in ctx.metrics:
            ctx.log.debug("model_selection_unscored", round=ctx.round, reason="no server metrics")
            return
        try:
            value = read_metric(ctx.metrics, SERVER_METRICS, self.settings.key_metric)
        except Unusable as err:
            ctx.log.warning("model_selection_unscored", round=ctx.round, reason=str(err))
            self._publish(ctx, skipped={"server": str(err)})
            return
        self._consider(ctx, Score(value, ()), model_round=ctx.round, weights=ctx.global_model)

    @hookimpl
    def test_round(self, ctx: ServerContext) -> None:
        ctx.state[PLUGIN_NAME]["tested_round"] = ctx.round

    @hookimpl
    def end_round(self, ctx: ServerContext) -> None:
        if ctx.is_last_round:
            if self.settings.source == "clients":
                self._score_final_model(ctx)
            elif str(ctx.round) not in ctx.state[PLUGIN_NAME]["scores"]:
                ctx.log.warning(
                    "final_model_unscored",
                    round=ctx.round,
                    reason=f"no usable {self.settings.metric_label} for the last round's model",
                )
        self._publish(ctx)

    @hookimpl
    def finish(self, ctx: ServerContext) -> None:
        self._settle(ctx)
        best = ctx.state[PLUGIN_NAME]["best"]
        if best is None:
            ctx.log.warning(
                "no_best_model", reason=f"no model got a usable {self.settings.metric_label}"
            )
            return
        path = self.files.model_path
        ctx.log.info(
            "best_model",
            model_round=best["round"],
            metric=best["metric"],
            metric_name=best["metric_name"],
            path=str(path) if path else None,
        )
        if ctx.console == "console":
            where = f" -> {path}" if path else ""
            print(
                f"best model: round {best['round']} ({best['metric_name']}={best['metric']:.4g}, "
                f"{best['mode']}){where}",
                file=sys.stderr,
                flush=True,
            )

    @hookimpl
    def rollback(self, ctx: ServerContext) -> None:
        self._restore(ctx)

    @hookimpl
    def shutdown(self, ctx: ServerContext) -> None:
        self._settle(ctx)

    # -- scoring ----------------------------------------------------------------------------

    def _score_clients(
        self, ctx: ServerContext, reports: Sequence[tuple[str, Mapping[str, Any], int | None]]
    ) -> Score:
        """The weighted mean over ``(client, metrics, local iterations)``; unusable values are
        skipped and logged."""
        s = self.settings
        counted, skipped = [], {}
        for client, metrics, iterations in reports:
            try:
                value = read_metric(metrics, s.validation_metric_name, s.key_metric)
                weight = client_weight(s.weight_of(client), iterations, s.weigh_by_local_iter)
            except Unusable as err:
                skipped[client] = str(err)
                ctx.log.warning(
                    "model_selection_skipped", client=client, round=ctx.round, reason=str(err)
                )
                continue
            counted.append(ClientScore(client, value, weight))
        score = weighted_score(counted, skipped)
        if score.value is None:
            ctx.log.warning(
                "model_selection_unscored",
                round=ctx.round,
                reason=f"no client reported a usable {s.metric_label} with a positive weight",
                skipped=dict(score.skipped),
            )
        return score

    def _score_final_model(self, ctx: ServerContext) -> None:
        """Score the model the last round produced, which no client ever received to train on.

        The clients' test of it in this round's ``test_round`` is reused when there was one;
        otherwise they validate it once more. Either is the same evaluation on the same split
        that produced their ``initial_validation`` of the models before it.
        """
        state = ctx.state[PLUGIN_NAME]
        if state["tested_round"] == ctx.round and ctx.client_tests:
            tests, via = ctx.client_tests, "round_test"
        else:  # the round's cohort, as a round test would have asked
            tests, via = ctx.validate_on_clients(ctx.global_model), "validation_pass"
        name = self.settings.validation_metric_name
        reports = [
            (client, validation_view(metrics), state["local_iterations"].get(client))
            for client, metrics in tests.items()
        ]
        if not any(name in view for _, view, _ in reports):
            # a metric of the training, not of a validation: no client can say it of a model
            # it does not train on; one warning instead of one skip per client
            ctx.log.warning(
                "final_model_unscored",
                round=ctx.round,
                via=via,
                reason=f"the clients' validation of the final model has no {name!r}; "
                "validation_metric_name 'initial_validation_metric' or 'initial_validation' "
                "scores it",
            )
            return
        score = self._score_clients(ctx, reports)
        ctx.log.info(
            "final_model_scored",
            model_round=ctx.round,
            via=via,
            metric=score.value,
            clients=len(score.clients),
        )
        self._consider(ctx, score, model_round=ctx.round, weights=ctx.global_model, final=True)

    def _consider(
        self,
        ctx: ServerContext,
        score: Score,
        *,
        model_round: int,
        weights: Mapping[str, torch.Tensor],
        final: bool = False,
    ) -> None:
        """Record ``score`` for the global model of ``model_round``; keep that model when it
        beats the best so far."""
        state = ctx.state[PLUGIN_NAME]
        s = self.settings
        if score.value is None:
            self._publish(ctx, skipped=score.skipped)
            return
        state["scores"][str(model_round)] = score.value
        ctx.log.info(
            "model_scored",
            round=ctx.round,
            model_round=model_round,
            metric=score.value,
            metric_name=s.metric_label,
        )
        best_value = state["best"]["metric"] if state["best"] else None
        if is_better(score.value, best_value, s.higher_is_better):
            best = BestModel(
                round=model_round,
                metric=score.value,
                metric_name=s.metric_label,
                mode="min" if s.mode == "min" else "max",
                source=s.source,
                scored_in_round=ctx.round,
                final=final,
                clients=score.per_client(),
                skipped=dict(score.skipped),
            )
            self._keep(ctx, best, weights)
        self._publish(ctx, scored={model_round: score.value}, skipped=score.skipped)

    def _keep(
        self, ctx: ServerContext, best: BestModel, weights: Mapping[str, torch.Tensor]
    ) -> None:
        """Write the new best, record it, announce it; undo all three if a listener fails."""
        state = ctx.state[PLUGIN_NAME]
        meta = {
            "kind": "best_model",
            "round": best.round,
            "job": ctx.job.job.name,
            "metric_name": best.metric_name,
            "metric": best.metric,
        }
        record = best.to_json()
        if not self.files.pending:
            self._written_in = ctx.round
        state["version"] = self.files.write(weights, meta, record)
        state["best"] = record
        ctx.log.info(
            "best_model_selected",
            round=ctx.round,
            model_round=best.round,
            metric=best.metric,
            metric_name=best.metric_name,
            final=best.final,
        )
        try:
            ctx.fire("best_model_selected", best=best, weights=weights)
        except Exception:
            # the chain rolls back the handlers before this one, not this one: undo the files
            # here; the core restores ctx.state when the round fails
            self._restore(ctx)
            raise

    def _publish(
        self,
        ctx: ServerContext,
        scored: Mapping[int, float] | None = None,
        skipped: Mapping[str, str] | None = None,
    ) -> None:
        """This round's line in ``metrics.jsonl`` and on the console: the scores taken this
        round (model round -> score), the best round so far and its score, who was skipped."""
        state = ctx.state[PLUGIN_NAME]
        entry = ctx.metrics.setdefault(PLUGIN_NAME, {})
        scores = entry.setdefault("scores", {})
        for model_round, value in (scored or {}).items():
            scores[str(model_round)] = value
        if skipped:
            merged = {**entry.get("skipped", {}), **skipped}
            entry["skipped"] = {c: merged[c] for c in sorted(merged)}
        if state["best"] is not None:
            entry["best_round"] = state["best"]["round"]
            entry["best"] = state["best"]["metric"]

    def _settle(self, ctx: ServerContext) -> None:
        """Make the files agree with the selection in ``ctx.state`` and commit them.

        Should a failed round's rollback not have put them back (it raised, say), the core
        restored ``ctx.state`` but the files still hold that round's best: put them back."""
        state = ctx.state.get(PLUGIN_NAME)
        if state is not None and self.files.pending and state["version"] != self.files.version:
            self._restore(ctx)
        if state is not None and state["version"] != self.files.version:
            ctx.log.error(
                "best_model_out_of_step",
                files_version=self.files.version,
                state_version=state["version"],
            )
        self.files.commit()
        self._written_in = None

    def _restore(self, ctx: ServerContext) -> int | None:
        """Put the files back as at the start of the round that wrote them."""
        written_in, self._written_in = self._written_in, None
        restored = self.files.restore()
        if restored is not None:
            ctx.log.info("best_model_restored", round=written_in, version=restored)
        return restored


def validation_view(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A client's validation of the final model, named as its contribution names the
    validation of a received model: ``initial_validation`` (the metrics),
    ``initial_validation_metric`` (the client's one number), and each metric by its name."""
    from flcore import primary_metric  # the core's evaluation module: torch, on first use

    measured = {k: v for k, v in metrics.items() if k != "num_samples"}
    view: dict[str, Any] = dict(measured)
    view["initial_validation"] = measured
    try:
        primary = primary_metric({k: as_number(v, k) for k, v in measured.items()})
    except Unusable:
        primary = None
    if primary is not None:
        view["initial_validation_metric"] = primary
    return view
