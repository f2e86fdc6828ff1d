"""BatchNorm statistics recomputed per posterior sample, federated, exactly pooled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from flcore_swag import SWAGPlugin
from flcore_swag.batchnorm import batchnorm_statistics, pool, statistic_names
from flcore_swag.posterior import Posterior
from flcore_swag.predict import bayesian_model_average
from swag_helpers import digits_shards, swag_job
from swag_tasks import BatchNormMLP
from torch.utils.data import TensorDataset

from flcore import (
    ClientHost,
    FLCoreError,
    decode_tensors,
    encode_tensors,
    hookimpl,
    load_run,
    predict_run,
    run_job,
)
from flcore.logging import make_logger


def _first_layer_inputs(model: BatchNormMLP, data: TensorDataset) -> np.ndarray:
    with torch.no_grad():
        return model.inp(data.tensors[0]).to(torch.float64).numpy()


def test_statistics_are_the_exact_moments_of_the_layer_input() -> None:
    torch.manual_seed(0)
    model = BatchNormMLP(12)
    data = digits_shards(1)[0]
    before = {n: b.clone() for n, b in model.named_buffers()}
    stats = batchnorm_statistics(model, data, batch_size=32)
    x = _first_layer_inputs(model, data)
    assert set(stats) == {"norm.running_mean", "norm.running_var"} == set(statistic_names(model))
    np.testing.assert_allclose(stats["norm.running_mean"].numpy(), x.mean(0), atol=1e-12)
    np.testing.assert_allclose(stats["norm.running_var"].numpy(), x.var(0), rtol=1e-10)
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())  # untouched


def test_clients_statistics_pool_to_those_of_all_their_data() -> None:
    torch.manual_seed(0)
    model = BatchNormMLP(12)
    shards = digits_shards(3)
    answers = [(len(s), [batchnorm_statistics(model, s, batch_size=32)]) for s in shards]
    dtypes = {n: torch.float64 for n in statistic_names(model)}
    pooled = pool(answers, dtypes)[0]
    union = TensorDataset(*(torch.cat([s.tensors[i] for s in shards]) for i in range(2)))
    direct = batchnorm_statistics(model, union, batch_size=32)
    for key in direct:
        torch.testing.assert_close(pooled[key], direct[key], rtol=1e-10, atol=1e-12)


def test_a_last_batch_of_one_is_folded_into_the_one_before() -> None:
    torch.manual_seed(0)
    model = BatchNormMLP(4)
    shard = digits_shards(1)[0]
    data = TensorDataset(shard.tensors[0][:33], shard.tensors[1][:33])
    stats = batchnorm_statistics(model, data, batch_size=32)  # would raise on a batch of one
    np.testing.assert_allclose(
        stats["norm.running_var"].numpy(), _first_layer_inputs(model, data).var(0), rtol=1e-10
    )


@pytest.fixture(scope="module")
def batchnorm_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    job = swag_job(job={"task": "swag_tasks:BatchNormDigits"}, swag={"samples": 4})
    return job, run_job(job, out=tmp_path_factory.mktemp("bn") / "run")


def test_every_sample_gets_the_statistics_of_all_clients_data(batchnorm_run: Any) -> None:
    job, result = batchnorm_run
    posterior = Posterior.load(result.run_dir / "swag.safetensors")
    assert len(posterior.batchnorm) == posterior.samples == 4
    assert result.history[-1]["swag"]["batchnorm_samples"] == 4
    # the clients' training splits, as the run made them
    host = ClientHost(job.to_toml(), job.source, range(3), None, make_logger(None))
    clients = list(host.clients.values())
    union = TensorDataset(
        *(torch.cat([c.train_data.tensors[i] for c in clients]) for i in range(2))
    )
    model = clients[0].model
    means = []
    for index, theta in enumerate(posterior.draws(4)):
        posterior.load_sample(model, theta)
        direct = batchnorm_statistics(model, union, batch_size=32)
        for key, value in posterior.batchnorm[index].items():
            assert value.dtype == torch.float32
            torch.testing.assert_close(value, direct[key].to(torch.float32), rtol=1e-5, atol=1e-6)
        means.append(posterior.batchnorm[index]["norm.running_mean"])
    assert not torch.equal(means[0], means[1])  # each sample has its own statistics


def test_predictions_use_each_samples_statistics(batchnorm_run: Any) -> None:
    _, result = batchnorm_run
    run = load_run(result.run_dir)
    inputs = digits_shards(1)[0].tensors[0][:50]
    with_stats = predict_run(run, inputs)
    assert with_stats["samples"] == 4
    posterior = Posterior.load(result.run_dir / "swag.safetensors")
    stale = bayesian_model_average(run.model, attrs.evolve(posterior, batchnorm=()), inputs, 4)
    assert not torch.allclose(with_stats["probabilities"], stale["probabilities"])
    with pytest.raises(FLCoreError, match="BatchNorm statistics for 4 samples"):
        predict_run(run, inputs, samples=5)


def test_without_bn_update_samples_keep_the_global_statistics(tmp_path: Path) -> None:
    job = swag_job(job={"task": "swag_tasks:BatchNormDigits"}, swag={"bn_update": False})
    result = run_job(job, out=tmp_path / "run")
    posterior = Posterior.load(result.run_dir / "swag.safetensors")
    assert posterior.batchnorm == ()
    assert result.history[-1]["swag"]["batchnorm_samples"] == 0


class BadStatistics:
    """Answers client-1's BatchNorm request with a negative variance."""

    @hookimpl
    def client_request(
        self, ctx: Any, request: str, payload: bytes | bytearray
    ) -> bytes | bytearray | None:
        if request != "swag_batchnorm" or ctx.client_id != "client-1":
            return None
        honest = SWAGPlugin(ctx.settings("swag")).client_request(ctx, request, payload)
        tensors, meta = decode_tensors(honest)
        tensors["bn/0/norm.running_var"] = -tensors["bn/0/norm.running_var"]
        return encode_tensors(tensors, meta)


def test_bad_batchnorm_statistics_are_refused(tmp_path: Path) -> None:
    job = swag_job(
        chain=["bad", "swag"], job={"task": "swag_tasks:BatchNormDigits"}, swag={"samples": 2}
    )
    result = run_job(job, out=tmp_path / "run", extra_plugins={"bad": BadStatistics()})
    refused = result.history[-1]["refused"]
    assert list(refused) == ["client-1"] and "negative variances" in refused["client-1"]
    assert len(Posterior.load(result.run_dir / "swag.safetensors").batchnorm) == 2
