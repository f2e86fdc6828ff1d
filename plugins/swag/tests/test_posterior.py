"""Sampling from the posterior, and its file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from flcore_swag.aggregation import moment_match
from flcore_swag.moments import SnapshotMoments
from flcore_swag.posterior import Posterior
from swag_helpers import digits_shards, snapshots

from flcore import CodecError, FLCoreError, load_tensors, save_tensors


def _posterior(model: torch.nn.Module, rank: int = 4, clients: int = 2, **kw: Any) -> Posterior:
    """A posterior moment-matched from real SGD snapshots of ``model`` on digits shards."""
    components = []
    for c, shard in enumerate(digits_shards(clients, classes=(0, 1))):
        acc = SnapshotMoments(rank)
        for shot in snapshots(shard, model, steps=20, every=2, seed=c, lr=0.1):
            acc.add(shot)
        components.append((acc.result(), float(len(shard))))
    return Posterior(moment_match(components, rank=rank), sample_seed=7, **kw)


@pytest.fixture(scope="module")
def small() -> Posterior:
    """A posterior over a small model (a 64 -> 2 linear classifier, 130 parameters)."""
    torch.manual_seed(0)
    return _posterior(torch.nn.Linear(64, 2), rank=4)


def _vector(theta: dict[str, torch.Tensor], names: tuple[str, ...]) -> torch.Tensor:
    return torch.cat([theta[n].flatten() for n in names])


def test_scale_zero_returns_the_mean_exactly(small: Posterior) -> None:
    mean_only = attrs.evolve(small, scale=0.0)
    for theta in mean_only.draws(3):
        assert all(torch.equal(theta[n], small.mean[n]) for n in small.names)


def test_samples_are_pairwise_distinct(small: Posterior) -> None:
    draws = torch.stack([_vector(t, small.names) for t in small.draws(30)])
    distances = torch.cdist(draws, draws)
    off_diagonal = distances[~torch.eye(30, dtype=torch.bool)]
    assert bool((off_diagonal > 0).all())
    # and not merely distinct: spread like the posterior (E|a - b|^2 = 2 trace(Sigma))
    expected = math.sqrt(2 * float(small.covariance().trace()))
    assert 0.8 * expected < float(off_diagonal.mean()) < 1.2 * expected


def test_the_same_seed_gives_the_same_samples(small: Posterior) -> None:
    first = [_vector(t, small.names) for t in small.draws(3)]
    again = [_vector(t, small.names) for t in small.draws(3)]
    other = [_vector(t, small.names) for t in small.draws(3, seed=8)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_many_samples_match_the_posterior_mean_and_covariance(small: Posterior) -> None:
    n = 20000
    draws = torch.stack([_vector(t, small.names) for t in small.draws(n)]).numpy()
    mean = _vector(dict(small.mean), small.names).numpy()
    cov = small.covariance().numpy()  # scale * (diag(var) + D D^T / (K - 1))
    sd = np.sqrt(np.diag(cov))
    # Monte-Carlo standard errors: of a mean, sd / sqrt(n); of a Gaussian covariance entry,
    # sqrt((S_ii S_jj + S_ij^2) / n).
    assert np.all(np.abs(draws.mean(0) - mean) < 5 * sd / math.sqrt(n))
    empirical = np.cov(draws, rowvar=False)
    error = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
    assert np.all(np.abs(empirical - cov) < 6 * error)
    # the low-rank part matters here: the covariance is far from diagonal
    corr = cov / np.outer(sd, sd)
    assert np.abs(corr[~np.eye(len(cov), dtype=bool)]).max() > 0.5


def test_the_std_used_is_the_square_root_of_the_variance(small: Posterior) -> None:
    std = small.std()
    for name in small.names:
        var = small.gaussian.var[name].clamp_min(small.var_clamp)  # dead pixels: zero variance
        torch.testing.assert_close(std[name] ** 2, var, rtol=1e-12, atol=0)
    ones = {n: torch.ones_like(small.mean[n]) for n in small.names}
    theta = small.combine(ones, torch.zeros(small.rank, dtype=torch.float64))
    for name in small.names:
        step = (theta[name] - small.mean[name]) / math.sqrt(small.scale)
        torch.testing.assert_close(step, std[name], rtol=1e-9, atol=1e-16)
        assert bool((step[small.gaussian.var[name] > 1e-20] > 1e-10).all())


def test_a_variance_below_the_clamp_is_raised_to_it(small: Posterior) -> None:
    zero_var = {n: torch.zeros_like(v) for n, v in small.gaussian.var.items()}
    clamped = attrs.evolve(
        small, gaussian=attrs.evolve(small.gaussian, var=zero_var), var_clamp=1e-8
    )
    assert all(bool((s == 1e-4).all()) for s in clamped.std().values())


def test_a_diagonal_posterior_samples_without_columns() -> None:
    torch.manual_seed(0)
    diag = _posterior(torch.nn.Linear(64, 2), rank=0, scale=1.0)
    assert diag.rank == 0
    theta = next(diag.draws(1))
    assert not torch.equal(theta["weight"], diag.mean["weight"])


# -- the file ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scrambled() -> tuple[Any, Posterior]:
    from swag_tasks import Scrambled

    torch.manual_seed(0)
    model = Scrambled(8)
    return model, _posterior(model, rank=3, scale=0.5, samples=5)


def test_a_posterior_survives_a_model_whose_names_do_not_sort_in_order(
    scrambled: tuple[Any, Posterior], tmp_path: Path
) -> None:
    from swag_tasks import Scrambled

    model, posterior = scrambled
    registered = tuple(n for n, _ in model.named_parameters())
    assert posterior.names == registered and list(registered) != sorted(registered)
    posterior.save(tmp_path)
    tensors, _ = load_tensors(tmp_path / "swag.safetensors")
    assert [k.removeprefix("mean/") for k in tensors if k.startswith("mean/")] != list(registered)
    loaded = Posterior.load(tmp_path / "swag.safetensors")
    assert loaded.names == registered
    for name in registered:
        assert torch.equal(loaded.mean[name], posterior.mean[name])
        assert torch.equal(loaded.gaussian.var[name], posterior.gaussian.var[name])
        assert torch.equal(loaded.gaussian.dev[name], posterior.gaussian.dev[name])
    fresh = Scrambled(8)
    mean = next(attrs.evolve(loaded, scale=0.0).draws(1))
    loaded.load_sample(fresh, mean)
    for name, param in fresh.named_parameters():
        assert torch.equal(param, posterior.mean[name].to(param.dtype)), name
    # the same draws before and after the round trip
    for a, b in zip(posterior.draws(3), loaded.draws(3), strict=True):
        assert all(torch.equal(a[n], b[n]) for n in registered)


def test_a_truncated_posterior_file_is_a_clear_error(
    scrambled: tuple[Any, Posterior], tmp_path: Path
) -> None:
    _, posterior = scrambled
    path = posterior.save(tmp_path)
    data = path.read_bytes()
    for cut in (4, 200, len(data) // 2, len(data) - 3):
        path.write_bytes(data[:cut])
        with pytest.raises(CodecError, match=r"truncated|malformed") as err:
            Posterior.load(path)
        assert str(path) in str(err.value)
    path.unlink()
    with pytest.raises(CodecError, match="cannot read"):
        Posterior.load(path)


def _rewrite(path: Path, change: Any) -> None:
    tensors, meta = load_tensors(path)
    change(tensors, meta)
    save_tensors(path, tensors, meta)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda t, m: m.update(kind="swag_moments"), "not a SWAG posterior"),
        (lambda t, m: m.update(format=2), "unknown posterior format"),
        (lambda t, m: m.update(scale=-1.0), "scale must be"),
        (lambda t, m: m.update(samples="30"), "'samples' must be int"),
        (lambda t, m: m.update(rank=7), "rank 7 but 3"),
        (lambda t, m: m.update(names=m["names"][1:]), "do not match the parameter names"),
        (lambda t, m: t.pop("var/zeta.weight"), "missing \\['var/zeta.weight'\\]"),
        (lambda t, m: t.__setitem__("mean/m", torch.full((10,), float("nan"))), "NaN"),
        (lambda t, m: t.__setitem__("var/m", -torch.ones(10)), "negative variances"),
        (lambda t, m: t.__setitem__("bn/0/x.running_mean", torch.zeros(2)), "unexpected tensor"),
    ],
)
def test_a_tampered_posterior_file_is_refused(
    scrambled: tuple[Any, Posterior], tmp_path: Path, change: Any, reason: str
) -> None:
    _, posterior = scrambled
    path = posterior.save(tmp_path)
    _rewrite(path, change)
    with pytest.raises(CodecError, match=reason):
        Posterior.load(path)


def test_a_posterior_for_another_model_does_not_fit(scrambled: tuple[Any, Posterior]) -> None:
    from swag_tasks import Scrambled

    _, posterior = scrambled
    posterior.check_fits(Scrambled(8))
    with pytest.raises(FLCoreError, match=r"'zeta\.weight' has shape"):
        posterior.check_fits(Scrambled(9))
    with pytest.raises(FLCoreError, match="no posterior for"):
        posterior.check_fits(torch.nn.Linear(64, 10))
