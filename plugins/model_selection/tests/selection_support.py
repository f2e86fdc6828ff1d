"""What the model-selection tests share: small digits jobs, readers of a run directory, and
test plugins that do real work in a real run (record what clients report, degrade a model,
validate on the server's data, fail on purpose)."""

from __future__ import annotations

import json
import math
from collections.abc import Generator, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from flcore import Job, hookimpl, load_tensors

#: Small enough to train in well under a second per round on two cores, large enough that
#: accuracy climbs from chance to ~0.8 in three rounds.
BASE_JOB: dict[str, Any] = {
    "job": {
        "name": "selection",
        "task": "examples.digits",
        "rounds": 3,
        "clients": 3,
        "seed": 0,
        "keep_round_models": True,
    },
    "task": {"hidden": 32},
    "local": {"epochs": 1, "batch_size": 16, "lr": 0.1, "momentum": 0.9},
}


def digits_job(
    chain: Iterable[str] = ("model_selection",),
    selection: Mapping[str, Any] | None = None,
    **sections: Mapping[str, Any],
) -> Job:
    """A small digits job; ``selection`` is ``[plugins.model_selection]``, ``sections`` update
    the other sections (``job={"rounds": 4}``)."""
    data: dict[str, Any] = {k: dict(v) for k, v in BASE_JOB.items()}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    data["plugins"] = {"chain": list(chain)}
    if selection is not None:
        data["plugins"]["model_selection"] = dict(selection)
    return Job.from_dict(data, source="selection.toml")


# -- reading a run directory ----------------------------------------------------------------


def events(run_dir: Path, name: str | None = None) -> list[dict[str, Any]]:
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    found = [json.loads(line) for line in lines if line.strip()]
    return [e for e in found if name is None or e["event"] == name]


def metrics_lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def best_record(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "best_model.json").read_text())


def round_model(run_dir: Path, round: int) -> Path:
    return run_dir / "rounds" / f"{round:04d}" / "global_model.safetensors"


def tensor_bytes(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of a model file as (dtype, shape, raw bytes): equal means the same model
    byte for byte, whatever metadata the two files carry."""
    weights, _ = load_tensors(path)
    return {
        name: (str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
        for name, t in sorted(weights.items())
    }


def file_bytes(run_dir: Path) -> dict[str, bytes | None]:
    """The best-model files' bytes (``None`` when absent)."""
    out: dict[str, bytes | None] = {}
    for name in ("best_model.safetensors", "best_model.json"):
        path = run_dir / name
        out[name] = path.read_bytes() if path.exists() else None
    return out


# -- hand computation -----------------------------------------------------------------------


def weighted(values: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """``sum(w * v) / sum(w)``, written out the plain way."""
    total = sum(weights[c] for c in values)
    return sum(weights[c] * values[c] for c in values) / total


def pick(scores: Mapping[int, float], mode: str = "max") -> int:
    """The round whose score is best; the earliest on a tie."""
    best = None
    for round in sorted(scores):
        value = scores[round]
        if best is None or (value > scores[best] if mode == "max" else value < scores[best]):
            best = round
    assert best is not None
    return best


# -- test plugins ---------------------------------------------------------------------------


class Recorder:
    """Records what the clients reported, round by round: in ``before_aggregation`` (ahead of
    model_selection in the chain) each contribution's metrics and local iterations, which
    score the model the round before produced; in ``end_round`` the clients' tests of the
    round's new model (``ctx.client_tests``)."""

    def __init__(self) -> None:
        self.reports: dict[int, dict[str, tuple[dict[str, Any], int]]] = {}
        self.tests: dict[int, dict[str, dict[str, float]]] = {}
        self.best_seen: list[dict[str, Any]] = []

    @hookimpl
    def before_aggregation(self, ctx: Any) -> None:
        self.reports[ctx.round] = {
            c.client_id: (json.loads(json.dumps(dict(c.metrics))), c.local_iterations)
            for c in ctx.contributions
        }

    @hookimpl
    def end_round(self, ctx: Any) -> None:
        self.tests[ctx.round] = {c: dict(m) for c, m in ctx.client_tests.items()}

    @hookimpl
    def best_model_selected(self, ctx: Any, best: Any, weights: Any) -> None:
        record = json.loads((ctx.run_dir / "best_model.json").read_text())
        on_disk = tensor_bytes(ctx.run_dir / "best_model.safetensors")
        given = {
            n: (str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
            for n, t in sorted(weights.items())
        }
        self.best_seen.append(
            {
                "in_round": ctx.round,
                "round": best.round,
                "metric": best.metric,
                "record_matches": record["round"] == best.round and record["metric"] == best.metric,
                "weights_match_file": given == on_disk,
            }
        )

    def values(
        self, name: str = "initial_validation_metric", key: str | None = None
    ) -> dict[int, dict[str, float]]:
        """Model round -> client -> value, from the contributions."""
        out: dict[int, dict[str, float]] = {}
        for round, reports in self.reports.items():
            row = {}
            for client, (metrics, _) in reports.items():
                value = metrics[name] if key is None else metrics[name][key]
                row[client] = value
            out[round - 1] = row
        return out


class Degrade:
    """Replaces the new global model with seeded noise in the given rounds, as a broken
    aggregation or a poisoned update would: those rounds' models are known to be bad."""

    def __init__(self, rounds: Iterable[int]) -> None:
        self.rounds = set(rounds)

    @hookimpl
    def after_aggregation(self, ctx: Any) -> None:
        if ctx.round not in self.rounds:
            return
        generator = torch.Generator().manual_seed(ctx.round)
        ctx.global_model = {
            name: torch.randn(t.shape, generator=generator, dtype=t.dtype) * 2.0
            for name, t in ctx.global_model.items()
        }


class ServerEval:
    """A real server-side validation that follows server_validation's contract: scores the new
    global model on the task's ``server_data()`` with the chain's ``evaluate`` and leaves
    ``ctx.metrics["server"] = {"loss", "accuracy"}``, on the given rounds only."""

    def __init__(self, rounds: Iterable[int]) -> None:
        self.rounds = set(rounds)
        self.scores: dict[int, dict[str, float]] = {}

    @hookimpl
    def after_aggregation(self, ctx: Any) -> None:
        if ctx.round not in self.rounds:
            return
        model = ctx.task.model()
        model.load_state_dict(ctx.global_model)
        metrics = ctx.ask("evaluate", model=model, data=ctx.task.server_data())
        ctx.metrics["server"] = dict(metrics)
        self.scores[ctx.round] = dict(metrics)


class FailAt:
    """Raises in ``hook`` in round ``round``, ``times`` times; remembers the best-model files
    as they were when that round started, and what they held when it raised."""

    def __init__(self, hook: str, round: int, times: int = 1) -> None:
        self.hook, self.round, self.times = hook, round, times
        self.at_round_start: dict[str, bytes | None] | None = None
        self.when_raised: dict[str, bytes | None] | None = None
        self.raised = 0

    @hookimpl
    def start_round(self, ctx: Any) -> None:
        if ctx.round == self.round and self.at_round_start is None:
            self.at_round_start = file_bytes(ctx.run_dir)

    def _maybe_fail(self, ctx: Any, hook: str) -> None:
        if hook == self.hook and ctx.round == self.round and self.raised < self.times:
            self.raised += 1
            self.when_raised = file_bytes(ctx.run_dir)
            raise RuntimeError(f"{hook} failed on purpose in round {ctx.round}")

    @hookimpl
    def before_aggregation(self, ctx: Any) -> None:
        self._maybe_fail(ctx, "before_aggregation")

    @hookimpl
    def after_aggregation(self, ctx: Any) -> None:
        self._maybe_fail(ctx, "after_aggregation")

    @hookimpl
    def end_round(self, ctx: Any) -> None:
        self._maybe_fail(ctx, "end_round")

    @hookimpl
    def aggregate(self, ctx: Any, contributions: Any) -> None:
        self._maybe_fail(ctx, "aggregate")  # answers nothing: FedAvg aggregates

    @hookimpl
    def best_model_selected(self, ctx: Any, best: Any, weights: Any) -> None:
        self._maybe_fail(ctx, "best_model_selected")


class ClientMetric:
    """On the clients: report ``name`` in every contribution with a value per client (absent
    for clients not in ``values``), added around whichever local training answers (a pluggy
    wrapper: the core's own here)."""

    def __init__(self, name: str, values: Mapping[str, Any]) -> None:
        self.name = name
        self.values = dict(values)

    @hookimpl(wrapper=True)
    def local_train(self, ctx: Any, model: Any, data: Any) -> Generator[None, Any, Any]:
        result = yield
        if ctx.client_id in self.values:
            result["metrics"][self.name] = self.values[ctx.client_id]
        return result


class NaNValidation:
    """On one client, in one round: its validation yields NaN (a diverged evaluation), so its
    ``initial_validation_metric`` is NaN."""

    def __init__(self, client: str, round: int) -> None:
        self.client, self.round = client, round

    @hookimpl
    def evaluate(self, ctx: Any, model: Any, data: Any) -> dict[str, float] | None:
        if ctx.side == "client" and ctx.client_id == self.client and ctx.round == self.round:
            return {"loss": math.nan, "accuracy": math.nan}
        return None
