"""The uncertainty check of issue 3 on scikit-learn's digits: FedAvg trained on digits 0-4 over
four clients, then a SWAG round. SWAG must predict as well as the FedAvg model, be at least as
well calibrated, and be more uncertain on digits it never saw and on noise."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
from swag_helpers import ROOT


@pytest.fixture(scope="module")
def figures(example_run: Any) -> dict[str, dict[str, float]]:
    path = ROOT / "plugins" / "swag" / "examples" / "digits_uncertainty.py"
    spec = importlib.util.spec_from_file_location("digits_uncertainty", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result: dict[str, dict[str, float]] = script.report(example_run.run_dir)
    print("\n" + script.table(result))  # shown with pytest -s
    return result


def test_swag_predicts_as_well_as_fedavg(figures: dict[str, dict[str, float]]) -> None:
    fedavg, swag = figures["global"], figures["posterior"]
    assert abs(swag["accuracy"] - fedavg["accuracy"]) <= 0.02
    assert swag["nll"] <= 1.05 * fedavg["nll"]
    assert swag["ece"] <= fedavg["ece"] + 0.02


def test_swag_is_more_uncertain_out_of_distribution(figures: dict[str, dict[str, float]]) -> None:
    swag = figures["posterior"]
    for ood in ("unseen_digits", "noise"):
        assert swag[f"entropy_{ood}"] > swag["entropy_in"]
        assert swag[f"mi_{ood}"] > swag["mi_in"]
    assert swag["auroc_all"] > 0.7
