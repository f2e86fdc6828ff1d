"""Bayesian model averaging over SWAG samples, and the uncertainties it yields."""

from __future__ import annotations

import copy
from typing import Any

import torch

from flcore import FLCoreError
from flcore_swag.posterior import Posterior


def entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) over the last dimension; ``0 log 0 = 0``."""
    return torch.special.entr(probabilities).sum(dim=-1)


def bayesian_model_average(
    model: torch.nn.Module, posterior: Posterior, inputs: torch.Tensor, samples: int
) -> dict[str, Any]:
    """Average the softmax probabilities of ``samples`` posterior samples (never the logits).

    Returns ``prediction`` (argmax of the average), ``probabilities`` (the average),
    ``predictive_entropy`` H[E p], ``expected_entropy`` E[H p], ``mutual_information``
    (BALD: their difference, the part of the uncertainty that is about the weights), and the
    per-class ``variance`` and ``std`` of the probabilities across samples. ``model`` is left
    as it was; its buffers serve every sample unless the posterior has BatchNorm statistics.
    """
    if samples < 1:
        raise FLCoreError(f"samples must be at least 1, got {samples}")
    posterior.check_fits(model)
    if posterior.batchnorm and samples > len(posterior.batchnorm):
        raise FLCoreError(
            f"the posterior holds BatchNorm statistics for {len(posterior.batchnorm)} samples; "
            f"ask for at most that many, not {samples}"
        )
    work = copy.deepcopy(model)
    work.eval()
    mean = m2 = expected_entropy = torch.zeros(0)
    with torch.no_grad():
        for index, theta in enumerate(posterior.draws(samples)):
            posterior.load_sample(work, theta, index)
            p = torch.softmax(work(inputs).to(torch.float64), dim=-1)
            if index == 0:
                mean, m2, expected_entropy = p.clone(), torch.zeros_like(p), entropy(p)
                continue
            delta = p - mean  # Welford over the samples: no E[p^2] - E[p]^2 cancellation
            mean += delta / (index + 1)
            m2 += delta * (p - mean)
            expected_entropy += (entropy(p) - expected_entropy) / (index + 1)
    predictive_entropy = entropy(mean)
    variance = m2 / samples
    return {
        "prediction": mean.argmax(dim=-1),
        "probabilities": mean,
        "predictive_entropy": predictive_entropy,
        "expected_entropy": expected_entropy,
        "mutual_information": (predictive_entropy - expected_entropy).clamp_min(0.0),
        "variance": variance,
        "std": variance.sqrt(),
        "method": f"SWAG posterior ({samples} samples, scale {posterior.scale}, "
        f"rank {posterior.rank})",
        "samples": samples,
    }
