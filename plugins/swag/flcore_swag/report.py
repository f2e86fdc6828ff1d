"""How a SWAG round shows on the console."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flcore import LoadedRun, ServerContext


def swag_round_line(ctx: ServerContext, rounds: int) -> str:
    """``swag round 1/1  clients 3/3  snapshots=60  rank=20 ...``"""
    swag = ctx.metrics.get("swag", {})
    parts = [
        f"swag round {ctx.metrics.get('swag_round', '?')}/{rounds}",
        f"clients {len(ctx.metrics.get('clients', []))}/{len(ctx.clients)}",
    ]
    parts += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in swag.items()]
    if ctx.metrics.get("refused"):
        parts.append(f"refused={sorted(ctx.metrics['refused'])}")
    return "  ".join(parts)


def uncertainty_report(
    run: LoadedRun,
    inputs: Any,
    targets: Any,
    out_of_distribution: Mapping[str, Any],
    samples: int | None = None,
) -> dict[str, dict[str, float]]:
    """Score a finished run (:func:`flcore.load_run`) both ways: the global model alone
    and the run's ``predict`` (its posterior). For each: accuracy, NLL and ECE on the labelled
    in-distribution ``inputs``, and mean predictive entropy and mutual information on them and
    on every named out-of-distribution set, with the entropy's AUROC (in vs. out) and, for a
    posterior, the mutual information's."""
    import torch

    from flcore import global_model_prediction, predict_run
    from flcore_swag.metrics import accuracy, auroc, expected_calibration_error
    from flcore_swag.metrics import negative_log_likelihood as nll

    def answer(x: torch.Tensor, posterior: bool) -> dict[str, Any]:
        if posterior:
            return predict_run(run, x, samples)
        return global_model_prediction(run.ctx, run.model, x)

    report = {}
    for label, posterior in (("global", False), ("posterior", True)):
        inside = answer(inputs, posterior)
        p = inside["probabilities"]
        row = {
            "accuracy": accuracy(p, targets),
            "nll": nll(p, targets),
            "ece": expected_calibration_error(p, targets),
            "entropy_in": float(inside["predictive_entropy"].mean()),
        }
        if "mutual_information" in inside:
            row["mi_in"] = float(inside["mutual_information"].mean())
        outside_entropy, outside_mi = [], []
        for name, x in out_of_distribution.items():
            outside = answer(x, posterior)
            row[f"entropy_{name}"] = float(outside["predictive_entropy"].mean())
            if "mutual_information" in outside:
                row[f"mi_{name}"] = float(outside["mutual_information"].mean())
                outside_mi.append(outside["mutual_information"])
            row[f"auroc_{name}"] = auroc(
                inside["predictive_entropy"], outside["predictive_entropy"]
            )
            outside_entropy.append(outside["predictive_entropy"])
        row["auroc_all"] = auroc(inside["predictive_entropy"], torch.cat(outside_entropy))
        if outside_mi:
            row["auroc_mi_all"] = auroc(inside["mutual_information"], torch.cat(outside_mi))
        report[label] = row
    return report
