"""Moment matching of client Gaussians equals the moments of all snapshots pooled."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flcore_swag.aggregation import moment_match
from flcore_swag.moments import Gaussian, SnapshotMoments
from swag_helpers import digits_shards, flat, flat_columns, snapshots


def _gaussian(shots: list[dict[str, torch.Tensor]], rank: int) -> Gaussian:
    acc = SnapshotMoments(rank)
    for shot in shots:
        acc.add(shot)
    return acc.result()


@pytest.fixture(scope="module")
def clients() -> list[list[dict[str, torch.Tensor]]]:
    """Three clients' real SGD trajectories on their own digits shards, from different
    starting points and of different lengths (6, 9 and 12 snapshots)."""
    shards = digits_shards(3)
    return [snapshots(shards[c], steps=2 * (6 + 3 * c), every=2, seed=c) for c in range(3)]


def _pooled(
    clients: list[list[dict[str, torch.Tensor]]], names: tuple[str, ...], weights: list[float]
) -> tuple[np.ndarray, np.ndarray]:
    """The weighted mean and population variance of every snapshot of every client, each of
    client c's snapshots weighing weights[c] / (its snapshot count), in float64 numpy."""
    rows, w = [], []
    for shots, weight in zip(clients, weights, strict=True):
        rows += [flat(s, names) for s in shots]
        w += [weight / len(shots)] * len(shots)
    x, p = np.stack(rows), np.asarray(w) / sum(w)
    mean = p @ x
    return mean, p @ (x - mean) ** 2


def test_pooled_by_snapshot_count_equals_the_moments_of_all_snapshots(clients) -> None:
    gaussians = [_gaussian(shots, rank=20) for shots in clients]
    counts = [float(len(shots)) for shots in clients]
    matched = moment_match(list(zip(gaussians, counts, strict=True)), rank=20)
    names = matched.names
    everything = np.stack([flat(s, names) for shots in clients for s in shots])
    np.testing.assert_allclose(flat(dict(matched.mean), names), everything.mean(0), atol=1e-14)
    np.testing.assert_allclose(
        flat(dict(matched.var), names), everything.var(0), rtol=1e-9, atol=1e-16
    )
    assert all(matched.var[n].dtype == torch.float64 for n in names)


def test_pooled_by_sample_count_equals_the_weighted_moments(clients) -> None:
    gaussians = [_gaussian(shots, rank=20) for shots in clients]
    samples = [120.0, 150.0, 174.0]
    matched = moment_match(list(zip(gaussians, samples, strict=True)), rank=20)
    mean, var = _pooled(clients, matched.names, samples)
    np.testing.assert_allclose(flat(dict(matched.mean), matched.names), mean, atol=1e-14)
    np.testing.assert_allclose(flat(dict(matched.var), matched.names), var, rtol=1e-9, atol=1e-16)


def test_one_client_equals_centralised_swag(clients) -> None:
    alone = _gaussian(clients[2], rank=5)
    matched = moment_match([(alone, 174.0)], rank=5)
    for name in alone.names:
        assert torch.equal(matched.mean[name], alone.mean[name])
        assert torch.equal(matched.var[name], alone.var[name])
        torch.testing.assert_close(matched.dev[name], alone.dev[name], rtol=0, atol=1e-15)


def _mixture_low_rank(gaussians: list[Gaussian], weights: list[float]) -> np.ndarray:
    """sum_c w_c D_c D_c^T / (K_c - 1) + sum_c w_c (mu_c - mu)(mu_c - mu)^T, dense."""
    names = gaussians[0].names
    w = np.asarray(weights) / sum(weights)
    means = [flat(dict(g.mean), names) for g in gaussians]
    mu = sum(wc * m for wc, m in zip(w, means, strict=True))
    total = np.zeros((len(mu), len(mu)))
    for wc, g, m in zip(w, gaussians, means, strict=True):
        d = flat_columns(dict(g.dev), names)
        total += wc * (d @ d.T / (g.rank - 1) + np.outer(m - mu, m - mu))
    return total


def test_low_rank_part_reproduces_the_mixture_covariance(clients) -> None:
    gaussians = [_gaussian(shots, rank=4) for shots in clients]
    weights = [120.0, 150.0, 174.0]
    matched = moment_match(list(zip(gaussians, weights, strict=True)), rank=40)
    assert matched.rank == 3 * 4 + 3  # every client's columns plus one spread column each
    d = flat_columns(dict(matched.dev), matched.names)
    np.testing.assert_allclose(
        d @ d.T / (matched.rank - 1), _mixture_low_rank(gaussians, weights), atol=1e-15
    )


def test_rank_truncation_keeps_the_best_rank_k_part(clients) -> None:
    gaussians = [_gaussian(shots, rank=4) for shots in clients]
    weights = [1.0, 1.0, 1.0]
    full = _mixture_low_rank(gaussians, weights)
    matched = moment_match(list(zip(gaussians, weights, strict=True)), rank=5)
    assert matched.rank == 5
    d = flat_columns(dict(matched.dev), matched.names)
    kept = d @ d.T / 4
    top = np.linalg.eigvalsh(full)[::-1]
    np.testing.assert_allclose(np.linalg.eigvalsh(kept)[::-1][:5], top[:5], rtol=1e-8)
    # Eckart-Young: what is left is exactly the discarded eigenvalues
    np.testing.assert_allclose(
        np.linalg.norm(full - kept), math.sqrt(float((top[5:] ** 2).sum())), rtol=1e-6
    )


def test_the_variance_is_clamped_and_diag_only_has_no_columns(clients) -> None:
    frozen = {n: torch.zeros_like(v) for n, v in clients[0][0].items()}
    flat_line = _gaussian([frozen, frozen, frozen], rank=0)  # zero variance, no columns
    matched = moment_match([(flat_line, 1.0)], rank=0, var_clamp=1e-12)
    assert all(bool((matched.var[n] == 1e-12).all()) for n in matched.names)
    assert matched.rank == 0 and not matched.dev


def test_a_single_column_is_represented_by_two() -> None:
    # two one-snapshot clients: no client columns, one spread column between their means
    a = Gaussian(
        ("w",),
        {"w": torch.tensor([0.0, 2.0], dtype=torch.float64)},
        {"w": torch.zeros(2, dtype=torch.float64)},
        {},
    )
    b = Gaussian(
        ("w",),
        {"w": torch.tensor([2.0, 0.0], dtype=torch.float64)},
        {"w": torch.zeros(2, dtype=torch.float64)},
        {},
    )
    matched = moment_match([(a, 1.0), (b, 1.0)], rank=20)
    assert matched.rank == 2
    d = matched.dev["w"]
    # the mixture's covariance of two equal points at (0,2) and (2,0): [[1,-1],[-1,1]]
    torch.testing.assert_close(
        d.T @ d / 1, torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(matched.var["w"], torch.tensor([1.0, 1.0], dtype=torch.float64))


def test_bad_components_are_refused(clients) -> None:
    g = _gaussian(clients[0], rank=2)
    with pytest.raises(ValueError, match="at least one component"):
        moment_match([], rank=2)
    with pytest.raises(ValueError, match="positive"):
        moment_match([(g, 0.0)], rank=2)
    other = Gaussian(("x",), {"x": torch.zeros(1)}, {"x": torch.zeros(1)}, {})
    with pytest.raises(ValueError, match="same parameters"):
        moment_match([(g, 1.0), (other, 1.0)], rank=2)


def test_the_posterior_does_not_depend_on_the_thread_count(clients) -> None:
    """Runtimes run the server with different torch thread counts; a matrix product's
    rounding depends on it, so the truncation is computed on one thread."""
    gaussians = [_gaussian(shots, rank=4) for shots in clients]
    components = list(zip(gaussians, [1.0, 2.0, 3.0], strict=True))
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(moment_match(components, rank=5))
    finally:
        torch.set_num_threads(before)
    one, two = results
    assert all(torch.equal(one.dev[n], two.dev[n]) for n in one.names)
    assert torch.get_num_threads() == before
