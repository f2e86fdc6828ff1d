from __future__ import annotations

import pytest

from flcore import codec
from flcore.chain import Chain
from flcore.client import Client, read_validation
from flcore.errors import CodecError
from flcore.logging import make_logger
from flcore.task import load_task
from tests.conftest import small_job


@pytest.fixture
def client() -> Client:
    job = small_job()
    return Client(job, load_task(job), Chain([]), 0, make_logger())


def test_a_client_refuses_what_it_cannot_read(client: Client) -> None:
    with pytest.raises(CodecError, match="global model sent to client-0: truncated"):
        client.handle("train", b"\x00")
    with pytest.raises(CodecError, match="no round number"):
        client.handle("train", codec.encode(client.model.state_dict(), {}))
    with pytest.raises(CodecError, match="no plugin answers request 'steal_data'"):
        client.handle("steal_data", b"")


def test_a_client_refuses_a_model_of_another_shape(client: Client) -> None:
    import torch

    with pytest.raises(CodecError, match=r"missing \['0.bias'.*unexpected \['w'\]"):
        client.handle("train", codec.encode({"w": torch.zeros(1)}, {"round": 1}))
    weights = {k: v.clone() for k, v in client.model.state_dict().items()}
    weights["0.weight"] = weights["0.weight"].double()
    with pytest.raises(
        CodecError,
        match=r"tensor '0.weight' is torch.float64 \(16, 64\), the model's is torch.float32",
    ):
        client.handle("train", codec.encode(weights, {"round": 1}))


def test_validation_results_are_checked() -> None:
    def payload(results: object, n: object = 3) -> bytes:
        return codec.encode({}, {"kind": "validation", "num_samples": n, "results": results})

    assert read_validation(payload({"global": {"accuracy": 0.5}}), "c") == (
        3,
        {"global": {"accuracy": 0.5}},
    )
    for bad, message in [
        ({"global": {"accuracy": float("nan")}}, "not finite"),
        ({"global": {"accuracy": "high"}}, "not a number"),
        ({"global": 1}, "is not a mapping"),
        ([], "malformed"),
    ]:
        with pytest.raises(CodecError, match=message):
            read_validation(payload(bad), "c")
