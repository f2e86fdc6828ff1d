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


def test_clients_sharing_a_memo_decode_one_request_once_and_each_names_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from flcore.client import RequestMemo

    job = small_job(job={"clients": 3})
    task, memo = load_task(job), RequestMemo()
    model = task.model()
    clients = [Client(job, task, Chain([]), i, make_logger(), model=model) for i in range(3)]
    for c in clients:
        c.decoder = memo
    calls: list[str] = []
    real_decode = codec.decode_flat

    def counting_decode(payload, what="payload", copy=True):  # type: ignore[no-untyped-def]
        calls.append(what)
        return real_decode(payload, what, copy)

    monkeypatch.setattr(codec, "decode_flat", counting_decode)
    weights = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    payload = codec.encode(weights, {"kind": "global_model", "round": 4})
    for c in clients:
        got = c.receive(payload, "global model")
        assert c.ctx.round == 4 and all(torch.equal(got[k], weights[k]) for k in weights)
    assert calls == ["global model sent to client-0"]  # once for the three clients
    other = codec.encode(weights, {"kind": "global_model", "round": 5})
    clients[1].receive(other, "global model")
    assert clients[1].ctx.round == 5 and len(calls) == 2  # another payload: decoded anew
    for c in clients:  # a bad payload is not remembered: each client names itself
        with pytest.raises(CodecError, match=f"global model sent to {c.name}: truncated"):
            c.receive(bytearray(b"\x01"), "global model")
    memo.clear()
    assert memo.payload is None and memo.decoded is None


def validation_reply(results: object, n: object = 3) -> bytes:
    return bytes(codec.encode({}, {"kind": "validation", "num_samples": n, "results": results}))


@pytest.mark.parametrize(
    ("n", "results", "reason"),
    [
        (-1, {"global": {"loss": 0.5}}, "num_samples -1 is not a count in [1, 1000000000]"),
        (True, {"global": {"loss": 0.5}}, "num_samples True is not a count in [1, 1000000000]"),
        (1e9, {"global": {"loss": 0.5}}, "num_samples 1000000000.0 is not a count"),
        (10**9 + 1, {"global": {"loss": 0.5}}, "num_samples 1000000001 is not a count"),
        (0, {"global": {"loss": 0.5}}, "num_samples 0 is not a count in [1, 1000000000]"),
        (None, {"global": {}}, "num_samples None is not a count in [0, 1000000000]"),
        (3, {"global": {"accuracy": 1e308}}, "global.accuracy is 1e+308, beyond ±1e+12"),
        (3, {"global": {"accuracy": 1.5}}, "global.accuracy is 1.5, not an accuracy in [0, 1]"),
        (3, {"swag": {"top5_accuracy": -0.1}}, "swag.top5_accuracy is -0.1, not an accuracy"),
        (3, {"global": {"loss": float("inf")}}, "global.loss is not finite (inf)"),
        (3, {"global": {"loss": -1e13}}, "global.loss is -10000000000000.0, beyond ±1e+12"),
        (3, {"global": {"loss": True}}, "global.loss is a bool, not a number"),
    ],
)
def test_validation_replies_out_of_bounds_are_refused_with_their_reason(
    n: object, results: object, reason: str
) -> None:
    with pytest.raises(CodecError) as info:
        read_validation(validation_reply(results, n), "client-1")
    assert f"validation results from client-1: {reason}" in str(info.value)


def test_validation_replies_within_bounds_pass() -> None:
    results = {"global": {"loss": 1e12, "accuracy": 1.0, "val_accuracy": 0, "balanced": 7.0}}
    assert read_validation(validation_reply(results, 10**9), "c") == (10**9, results)
    # a client without validation data has nothing to weigh, and says so
    assert read_validation(validation_reply({"global": {}}, 0), "c") == (0, {"global": {}})
    assert read_validation(validation_reply({"global": {"loss": 0.1}}, 50), "c", 50)[0] == 50
    with pytest.raises(CodecError, match=r"num_samples 51 is not a count in \[1, 50\]"):
        read_validation(validation_reply({"global": {"loss": 0.1}}, 51), "c", 50)
