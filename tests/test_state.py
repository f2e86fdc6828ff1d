"""``flcore.state.state_dict`` returns what ``Module.state_dict()`` does, whatever changed."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from flcore.state import _WALKS, _Walk, state_dict


def assert_same(model: nn.Module) -> None:
    """Twice (the walk, then the shortcut): torch's keys, in order, the same tensors detached."""
    for _ in range(2):
        ours, theirs = state_dict(model), model.state_dict()
        assert list(ours) == list(theirs)
        for key, tensor in theirs.items():
            if not isinstance(tensor, torch.Tensor):
                assert ours[key] == tensor
                continue
            assert not ours[key].requires_grad
            assert ours[key].data_ptr() == tensor.data_ptr()
            assert ours[key].shape == tensor.shape and ours[key].dtype == tensor.dtype


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


class Tied(nn.Module):
    """A shared child under two names, tied weights, a bias-free layer, a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(3, 3, bias=False)
        self.again = self.block
        self.norm = nn.BatchNorm1d(3)
        self.out = nn.Linear(3, 3)
        self.out.weight = self.block.weight
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


@pytest.mark.parametrize("make", [mlp, Tied, lambda: nn.LSTM(3, 4, num_layers=2)])
def test_it_reads_what_torch_reads(make: Callable[[], nn.Module]) -> None:
    model = make()
    assert_same(model)
    assert isinstance(_WALKS[model], _Walk)  # the shortcut, not torch, answered the second call


def test_the_shortcut_reads_the_model_live() -> None:
    model: Any = mlp()
    weights = state_dict(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert torch.equal(state_dict(model)["0.weight"], model[0].weight)
    weights["0.bias"].zero_()  # a tensor of the result edits the model, as torch's does
    assert not model[0].bias.any()
    weights.clear()  # the dict is the caller's: the next call is whole
    assert len(state_dict(model)) == 4


def replace_parameter(model: Any) -> None:
    model[0].weight = nn.Parameter(torch.ones(8, 4))


def replace_data(model: Any) -> None:
    model[0].weight.data = torch.full((8, 4), 2.0)


def add_child(model: Any) -> None:
    model.append(nn.Linear(2, 2))


def replace_child(model: Any) -> None:
    model[2] = nn.Linear(8, 2, bias=False)


def add_buffer(model: Any) -> None:
    model[0].register_buffer("count", torch.tensor(3))


def hide_buffer(model: Any) -> None:
    model[0].register_buffer("count", torch.tensor(3), persistent=False)


def drop_bias(model: Any) -> None:
    model[0].bias = None


def rename_bias(model: Any) -> None:
    bias = model[0].bias
    del model[0].bias
    model[0].shift = bias


def add_hook(model: Any) -> None:
    extra = torch.zeros(1)

    def hook(module: nn.Module, out: dict[str, Any], prefix: str, meta: Any) -> None:
        out[prefix + "extra"] = extra

    model[2]._register_state_dict_hook(hook)


def parametrize_weight(model: Any) -> None:
    class Double(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    parametrize.register_parametrization(model[0], "weight", Double())


@pytest.mark.parametrize(
    "change",
    [
        replace_parameter,
        replace_data,
        add_child,
        replace_child,
        add_buffer,
        hide_buffer,
        drop_bias,
        rename_bias,
        add_hook,
        parametrize_weight,
    ],
)
def test_a_change_after_the_walk_is_seen(change: Callable[[Any], None]) -> None:
    model = mlp()
    state_dict(model)
    change(model)
    assert_same(model)


def test_a_none_that_becomes_a_tensor_is_seen() -> None:
    model = nn.Linear(2, 2, bias=False)
    state_dict(model)
    model.bias = nn.Parameter(torch.ones(2))
    assert list(state_dict(model)) == ["weight", "bias"]


class WithExtraState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)

    def get_extra_state(self) -> Any:
        return {"calls": 1}

    def set_extra_state(self, state: Any) -> None:
        pass


class OwnStateDict(nn.Linear):
    note = torch.ones(1)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        out = super().state_dict(*args, **kwargs)
        out["note"] = self.note
        return out


def scripted() -> nn.Module:
    """A scripted module keeps its state in wrappers of C++ dicts (torch deprecates it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(mlp())


def hooked() -> nn.Module:
    """State-dict hooks from the start (``read`` refuses them, so the walk is never used)."""
    model = mlp()
    add_hook(model)
    return model


@pytest.mark.parametrize("make", [WithExtraState, lambda: OwnStateDict(2, 2), scripted, hooked])
def test_a_model_that_builds_its_own_state_dict_is_left_to_torch(
    make: Callable[[], nn.Module],
) -> None:
    model = make()
    assert_same(model)
    assert _WALKS[model] is False


def test_keep_vars_gives_the_tensors_themselves_as_torch_does() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    for _ in range(2):  # the walk, then a read of it
        ours = state_dict(model, keep_vars=True)
        theirs = model.state_dict(keep_vars=True)
        assert list(ours) == list(theirs)
        assert all(ours[k] is theirs[k] for k in theirs)
        assert ours["0.weight"].requires_grad and ours["0.weight"] is model[0].weight
