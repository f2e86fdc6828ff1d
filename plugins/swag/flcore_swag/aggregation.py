"""Moment matching: one Gaussian with the mean and covariance of a mixture of Gaussians.

The clients' SWAG Gaussians ``N(mu_c, Sigma_c)`` with weights ``w_c`` (summing to one) form a
mixture whose first two moments are

    mu    = sum_c w_c mu_c
    Sigma = sum_c w_c Sigma_c + sum_c w_c (mu_c - mu)(mu_c - mu)^T     (law of total variance)

Both parts of SWAG's covariance follow this rule: the diagonal exactly, and the low-rank part
through columns whose outer products sum to it, truncated to the best rank K when there are
more (Eckart-Young). Everything is float64. Pooling every client's snapshots and computing
their moments gives the same mean and variance, to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from flcore_swag.moments import Gaussian


def weighted_moments(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, var)`` of a mixture of ``(mean_c, var_c)`` parts: the law of total variance,
    with the spread term computed from centred differences (never ``E[x^2] - E[x]^2``)."""
    total = math.fsum(weights)
    w = [x / total for x in weights]
    mean = sum(
        (wc * m.to(torch.float64) for wc, (m, _) in zip(w, parts, strict=True)),
        torch.zeros_like(parts[0][0], dtype=torch.float64),
    )
    var = torch.zeros_like(mean)
    for wc, (m, v) in zip(w, parts, strict=True):
        var += wc * (v.to(torch.float64) + (m.to(torch.float64) - mean) ** 2)
    return mean, var


def moment_match(
    components: Sequence[tuple[Gaussian, float]], rank: int, var_clamp: float = 0.0
) -> Gaussian:
    """The Gaussian that matches the mixture of ``(gaussian, weight)`` components.

    Its variance is clamped below at ``var_clamp``. Its deviation columns ``D`` (at most
    ``rank``) satisfy ``D D^T / (K - 1) = sum_c w_c D_c D_c^T / (K_c - 1) + sum_c w_c
    (mu_c - mu)(mu_c - mu)^T`` exactly when that matrix has at most ``rank`` non-zero columns,
    and are its best rank-``rank`` approximation otherwise. ``rank = 0`` gives SWAG-Diag.
    """
    if not components:
        raise ValueError("moment matching needs at least one component")
    names = components[0][0].names
    for gaussian, weight in components:
        if set(gaussian.names) != set(names):
            raise ValueError("every component must describe the same parameters")
        if not weight > 0:
            raise ValueError(f"component weights must be positive, got {weight}")
    weights = [weight for _, weight in components]
    total = math.fsum(weights)
    shares = [weight / total for weight in weights]
    mean, var = {}, {}
    for name in names:
        parts = [(g.mean[name], g.var[name]) for g, _ in components]
        mean[name], v = weighted_moments(parts, weights)
        var[name] = v.clamp_min(var_clamp)
    dev = _low_rank(components, shares, mean, names, rank) if rank else {}
    return Gaussian(names, mean, var, dev)


def _low_rank(
    components: Sequence[tuple[Gaussian, float]],
    shares: Sequence[float],
    mean: dict[str, torch.Tensor],
    names: tuple[str, ...],
    rank: int,
) -> dict[str, torch.Tensor]:
    # Columns B (by name, stacked along dim 0) with B^T B's outer-product sum equal to the
    # mixture's low-rank covariance: sqrt(w_c / (K_c - 1)) D_c and sqrt(w_c) (mu_c - mu).
    blocks: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for (gaussian, _), share in zip(components, shares, strict=True):
        if gaussian.rank:
            factor = math.sqrt(share / (gaussian.rank - 1))
            for name in names:
                blocks[name].append(factor * gaussian.dev[name])
        for name in names:
            blocks[name].append((math.sqrt(share) * (gaussian.mean[name] - mean[name]))[None])
    columns = {name: torch.cat(blocks[name]) for name in names}
    norms = torch.stack([_flat(c).pow(2).sum(dim=1) for c in columns.values()]).sum(dim=0)
    keep = torch.nonzero(norms > 0).flatten()
    columns = {name: c[keep] for name, c in columns.items()}
    count = len(keep)
    if count == 0:
        return {}
    if count == 1:
        # one column b: [b, -b] / sqrt(2) has D D^T / (2 - 1) = b b^T
        return {n: torch.cat([c, -c]) / math.sqrt(2.0) for n, c in columns.items()}
    if count > rank:
        # B = U S V^T; the top-``rank`` part is B V_k (= U_k S_k), found from B B^T's Gram
        # matrix, which is count x count however many parameters there are. One thread: a
        # matrix product's rounding depends on the thread count, and every runtime must
        # write the same posterior.
        with _one_thread():
            gram = sum(_flat(c) @ _flat(c).T for c in columns.values())
            _, vectors = torch.linalg.eigh(gram)
            top = vectors[:, -rank:].flip(1)
            columns = {n: torch.tensordot(top.T, c, dims=1) for n, c in columns.items()}
        count = rank
    return {n: c * math.sqrt(count - 1) for n, c in columns.items()}


@contextmanager
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _flat(columns: torch.Tensor) -> torch.Tensor:
    return columns.reshape(columns.shape[0], -1)
