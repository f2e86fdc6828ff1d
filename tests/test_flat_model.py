"""flcore.flat_model: a client's model moved into the wire layout trains, loads and sends the
same numbers as before, and anything it cannot vouch for takes the tensor-by-tensor path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import flcore.client
from flcore import codec
from flcore.chain import Chain
from flcore.client import Client
from flcore.contribution import Contribution
from flcore.flat_model import flat_model
from flcore.logging import make_logger
from flcore.markers import hookimpl
from flcore.run import run_job
from flcore.state import state_dict
from flcore.task import load_task
from tests.conftest import small_job


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def with_batchnorm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3, bias=False))


def train(model: nn.Module, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("make", [mlp, with_batchnorm])
def test_an_adopted_model_keeps_its_values_and_trains_to_the_same_bits(
    make: Callable[[], nn.Module],
) -> None:
    model, twin = make(), make()
    params = list(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wire = flat_model(model)
    assert wire is not None and flat_model(model) is wire  # adopted once
    assert list(model.parameters()) == params  # the same Parameter objects ...
    assert all(p.requires_grad for p in model.parameters())
    data = wire.flat.data
    assert data is not None
    start = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    for key, tensor in model.state_dict().items():  # ... now in the one buffer
        assert torch.equal(tensor, before[key])
        assert start <= tensor.data_ptr() < start + len(data)
    train(model)
    train(twin)
    for key, tensor in twin.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key


@pytest.mark.parametrize("make", [mlp, with_batchnorm])
def test_a_flat_payload_is_the_same_bytes_as_one_written_tensor_by_tensor(
    make: Callable[[], nn.Module],
) -> None:
    model = make()
    wire = flat_model(model)
    assert wire is not None
    train(model)
    meta = {"round": 3, "metrics": {"loss": 0.5}}
    assert codec.encode(wire.weights, meta, wire.flat) == codec.encode(state_dict(model), meta)
    contribution = Contribution("c", 3, wire.weights, 10, 1, flat=wire.flat)
    again = Contribution.decode(contribution.encode(), sender="c")
    for key, tensor in model.state_dict().items():
        assert torch.equal(again.weights[key], tensor)


def tied() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    return model


def transposed() -> nn.Module:
    model = nn.Linear(4, 3)
    model.weight = nn.Parameter(torch.randn(4, 3).t())  # a strided view, not its own memory
    return model


class OwnStateDict(nn.Linear):
    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return {"w": self.weight.detach()}


@pytest.mark.parametrize(
    "make",
    [tied, transposed, lambda: nn.LazyLinear(3), lambda: OwnStateDict(4, 3), nn.ReLU],
    ids=["tied", "non-contiguous", "lazy", "own state_dict", "no state"],
)
def test_a_model_it_cannot_vouch_for_is_left_as_it_is(make: Callable[[], nn.Module]) -> None:
    model = make()
    before = places(model)
    assert flat_model(model) is None
    assert places(model) == before


def places(model: nn.Module) -> list[tuple[int, int | None]]:
    """Each state tensor's identity and memory (none for a lazy module's unset parameter)."""
    return [
        (id(t), None if isinstance(t, nn.parameter.UninitializedParameter) else t.data_ptr())
        for t in [*model.parameters(), *model.buffers()]
    ]


@pytest.fixture
def client() -> Client:
    job = small_job()
    return Client(job, load_task(job), Chain([]), 0, make_logger())


def global_model(client: Client, value: float, round: int = 1) -> bytearray:
    weights = {k: torch.full_like(v, value) for k, v in client.model.state_dict().items()}
    return codec.encode(weights, {"kind": "global_model", "round": round})


def reply_weights(client: Client, payload: bytearray) -> dict[str, torch.Tensor]:
    return Contribution.decode(client.handle("train", payload), sender=client.name).weights


def test_a_client_loads_and_sends_through_the_buffer(client: Client) -> None:
    got = client.receive(global_model(client, 0.25), "global model")
    wire = flat_model(client.model)
    assert wire is not None and wire.intact(state_dict(client.model))
    assert all(torch.equal(t, torch.full_like(t, 0.25)) for t in client.model.state_dict().values())
    got["0.bias"][0] = 7.0  # the returned dict is the model's own (hooks may edit it)
    assert client.model.state_dict()["0.bias"][0] == 7.0
    sent = reply_weights(client, global_model(client, 0.5, round=2))
    for key, tensor in client.model.state_dict().items():
        assert torch.equal(sent[key], tensor)
    assert not torch.equal(sent["0.weight"], torch.full_like(sent["0.weight"], 0.5))  # trained


def replace_weight(model: nn.Module) -> None:
    model[0].weight = nn.Parameter(torch.zeros_like(model[0].weight))


def repoint_bias(model: nn.Module) -> None:
    model[0].bias.data = torch.zeros_like(model[0].bias)


def transpose_square_weight(model: nn.Module) -> None:
    square = model[2]  # small_job's MLP: Linear(16, 16), the same memory read transposed
    square.weight.data = square.weight.data.t()


@pytest.mark.parametrize("change", [replace_weight, repoint_bias, transpose_square_weight])
def test_a_tensor_moved_after_adoption_takes_the_tensor_by_tensor_path(
    client: Client, change: Callable[[nn.Module], None]
) -> None:
    client.receive(global_model(client, 0.25), "global model")
    change(client.model)
    wire = flat_model(client.model)
    assert wire is not None and not wire.intact(state_dict(client.model))
    client.receive(global_model(client, 0.75), "global model")
    assert all(torch.equal(t, torch.full_like(t, 0.75)) for t in client.model.state_dict().values())
    sent = reply_weights(client, global_model(client, 0.5, round=2))
    for key, tensor in client.model.state_dict().items():
        assert torch.equal(sent[key], tensor)


def test_a_run_gives_the_same_bytes_with_and_without_the_buffer(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = small_job(job={"rounds": 3})
    flat = run_job(job, out=tmp_path / "flat").global_model_path.read_bytes()
    monkeypatch.setattr(flcore.client, "flat_model", lambda model: None)
    plain = run_job(job, out=tmp_path / "plain").global_model_path.read_bytes()
    assert flat == plain


def test_a_flat_buffer_is_laid_out_even_after_its_layout_was_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    weights = {"w": torch.ones(2, 3), "n": torch.tensor(4)}
    first = codec.flat_buffer(weights)
    monkeypatch.setattr(codec, "_KNOWN", {})  # as when 64 newer layouts pushed it out
    again = codec.flat_buffer(weights)
    assert again.layout.key == first.layout.key and codec.layout_of(weights) is again.layout
    with pytest.raises(codec.CodecError, match="cannot be serialized"):
        codec.flat_buffer({"z": torch.zeros(2, dtype=torch.complex64)})


def test_loading_through_the_buffer_records_no_graph(client: Client) -> None:
    with torch.enable_grad():
        client.receive(global_model(client, 0.25), "global model")
    for parameter in client.model.parameters():
        assert parameter.requires_grad and parameter.is_leaf and parameter.grad_fn is None
    assert all(not run.requires_grad for run in flat_model(client.model).flat.runs)  # type: ignore[union-attr]


class EditsTheModel:
    """A ``receive_model`` handler: what it sees, and an edit to it."""

    def __init__(self) -> None:
        self.seen: dict[str, torch.Tensor] = {}

    @hookimpl
    def receive_model(self, ctx: Any, weights: dict[str, torch.Tensor]) -> None:
        self.seen = {k: v.clone() for k, v in weights.items()}
        weights["0.bias"].fill_(3.0)


def test_a_receive_model_handler_gets_the_model_s_own_state_dict_before_training() -> None:
    job = small_job()
    handler = EditsTheModel()
    client = Client(job, load_task(job), Chain([("edits", handler)]), 0, make_logger())
    client.handle("train", global_model(client, 0.25))
    assert list(handler.seen) == list(client.model.state_dict())
    assert all(torch.equal(t, torch.full_like(t, 0.25)) for t in handler.seen.values())
    # the edit reached the model: it trained from a bias of 3, not 0.25
    assert abs(float(client.model.state_dict()["0.bias"].mean()) - 3.0) < 1.0


def test_without_a_receive_model_handler_no_state_dict_is_built_for_it(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[bool] = []

    def counting(model: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        built.append(keep_vars)
        return state_dict(model, keep_vars)

    monkeypatch.setattr(flcore.client, "state_dict", counting)
    client.handle("train", global_model(client, 0.25))
    assert built and all(built)  # only the tensors themselves, to check where they are
