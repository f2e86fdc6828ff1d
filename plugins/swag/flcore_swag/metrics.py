"""Scores of probabilistic predictions: accuracy, NLL, calibration error, and how well an
uncertainty separates in- from out-of-distribution inputs (AUROC)."""

from __future__ import annotations

import torch


def accuracy(probabilities: torch.Tensor, targets: torch.Tensor) -> float:
    return float((probabilities.argmax(dim=-1) == targets).to(torch.float64).mean())


def negative_log_likelihood(
    probabilities: torch.Tensor, targets: torch.Tensor, eps: float = 1e-12
) -> float:
    """Mean ``-log p(target)`` in nats; ``eps`` keeps a confident mistake finite."""
    picked = probabilities.to(torch.float64).gather(-1, targets[:, None]).squeeze(-1)
    return float(-picked.clamp_min(eps).log().mean())


def expected_calibration_error(
    probabilities: torch.Tensor, targets: torch.Tensor, bins: int = 15
) -> float:
    """ECE: the sample-weighted mean of ``|accuracy - confidence|`` over ``bins`` equal-width
    confidence bins (Guo et al. 2017)."""
    confidence, predicted = probabilities.to(torch.float64).max(dim=-1)
    correct = (predicted == targets).to(torch.float64)
    index = (confidence * bins).long().clamp(max=bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if bool(members.any()):
            gap = (correct[members].mean() - confidence[members].mean()).abs()
            total += float(gap) * int(members.sum())
    return total / len(targets)


def auroc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """The probability that a positive scores above a negative (ties count half): the area
    under the ROC curve of the score, by the Mann-Whitney U statistic."""
    scores = torch.cat([negatives, positives]).to(torch.float64)
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    for value in scores.unique():  # average ranks over ties
        tied = scores == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    n_neg, n_pos = len(negatives), len(positives)
    u = float(ranks[n_neg:].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_neg * n_pos)
