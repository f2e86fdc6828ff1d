"""The scores of the digits check against hand computations."""

from __future__ import annotations

import math

import torch
from flcore_swag.metrics import accuracy, auroc, expected_calibration_error
from flcore_swag.metrics import negative_log_likelihood as nll


def test_accuracy_and_nll() -> None:
    p = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]])
    y = torch.tensor([0, 0, 1])
    assert accuracy(p, y) == 1 / 3
    expected = -(math.log(0.9) + math.log(0.4) + math.log(0.3)) / 3
    assert abs(nll(p, y) - expected) < 1e-7


def test_ece_by_hand() -> None:
    # confidences 0.95, 0.95 (one right) and 0.65 (right), 10 bins:
    # bin 9: |0.5 - 0.95| * 2, bin 6: |1 - 0.65| * 1; over 3 inputs
    p = torch.tensor([[0.95, 0.05], [0.05, 0.95], [0.65, 0.35]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0])
    assert abs(expected_calibration_error(p, y, bins=10) - (0.45 * 2 + 0.35) / 3) < 1e-12


def test_auroc_counts_pairs_and_half_ties() -> None:
    g = torch.Generator().manual_seed(0)
    neg = torch.randint(0, 5, (40,), generator=g).double()
    pos = torch.randint(2, 8, (30,), generator=g).double()
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert abs(auroc(neg, pos) - float(pairs.mean())) < 1e-12
    assert auroc(torch.zeros(3), torch.ones(3)) == 1.0
    assert auroc(torch.ones(3), torch.ones(3)) == 0.5
