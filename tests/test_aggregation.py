from __future__ import annotations

from typing import Any

import pytest
import torch

import flcore.aggregation as aggregation
from flcore.aggregation import WeightedMean, weighted_mean


@pytest.fixture(params=["kernel", "torch"])
def fold_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each exactness test runs with the compiled one-pass fold and with torch's two passes
    (an install without a C compiler): both must give the same bits."""
    if request.param == "torch":
        monkeypatch.setattr(aggregation, "_kernel", None)
    return str(request.param)


def test_the_one_pass_kernel_is_built() -> None:
    """``make install`` builds flcore._fold; a failed build would silently fall back."""
    assert aggregation._kernel is not None, "flcore._fold was not built (no C compiler?)"


@pytest.mark.parametrize("weights", [[3.0, 1.0, 4.0, 1.0, 5.0], [0.1, 1 / 3, 2.5e-3, 7.7, 1e6]])
def test_the_kernel_folds_with_torchs_bits(
    monkeypatch: pytest.MonkeyPatch, weights: list[float]
) -> None:
    """Integer weights (sample counts) and arbitrary ones; a model in hand, streamed, and
    both across many blocks with a ragged last block."""
    monkeypatch.setattr(aggregation, "BLOCK", 1000)
    gen = torch.Generator().manual_seed(3)
    models = [
        {
            "w": torch.randn(97, 31, generator=gen) * 10 ** (i - 2),
            "s": torch.randn(5, generator=gen),
        }
        for i in range(len(weights))
    ]
    pairs = list(zip(models, weights, strict=True))
    kernel = [weighted_mean(pairs), weighted_mean(iter(pairs))]
    monkeypatch.setattr(aggregation, "_kernel", None)
    torch_ = [weighted_mean(pairs), weighted_mean(iter(pairs))]
    for how, ours, theirs in zip(["in hand", "streamed"], kernel, torch_, strict=True):
        for name in theirs:
            assert ours[name].numpy().tobytes() == theirs[name].numpy().tobytes(), (how, name)


def test_a_large_mean_saves_and_loads_as_plain_tensors(tmp_path: Any) -> None:
    """Large sums and means live in numpy-allocated memory (huge pages): still ordinary
    tensors to torch.save, torch.load(weights_only=True) and in-place arithmetic."""
    big = {"w": torch.ones(2_000_000), "b": torch.zeros(3)}
    mean = weighted_mean([(big, 1.0), ({k: v * 3 for k, v in big.items()}, 1.0)])
    assert torch.equal(mean["w"], torch.full((2_000_000,), 2.0))
    torch.save(mean, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=True)
    assert torch.equal(loaded["w"], mean["w"]) and torch.equal(loaded["b"], mean["b"])
    mean["w"].add_(1.0)
    assert float(mean["w"][0]) == 3.0


def test_weighted_mean_matches_a_hand_computation() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(10)}
    b = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(21)}
    got = weighted_mean([(a, 1.0), (b, 2.0)])
    assert torch.equal(got["w"], torch.tensor([3.0, 6.0]))
    assert got["n"].dtype == torch.int64 and int(got["n"]) == round((10 + 42) / 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_mean_is_exact_for_every_floating_dtype(dtype: torch.dtype, fold_path: str) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(1000, generator=gen).to(dtype) for _ in range(7)]
    counts = [3, 1, 4, 1, 5, 9, 2]
    got = weighted_mean(({"x": t}, c) for t, c in zip(tensors, counts, strict=True))["x"]
    exact = sum(t.double() * c for t, c in zip(tensors, counts, strict=True)) / sum(counts)
    assert got.dtype == dtype
    assert torch.equal(got, exact.to(dtype))  # correctly rounded from the float64 mean


def test_identical_models_average_to_themselves_bit_for_bit() -> None:
    t = torch.randn(100)
    got = weighted_mean([({"x": t}, 3.0), ({"x": t.clone()}, 7.0), ({"x": t.clone()}, 11.0)])
    assert torch.equal(got["x"], t)


def test_boolean_buffers_take_the_weighted_majority() -> None:
    got = weighted_mean(
        [({"m": torch.tensor([True, False])}, 3.0), ({"m": torch.tensor([False, False])}, 1.0)]
    )
    assert got["m"].tolist() == [True, False]


def test_inputs_are_not_modified_and_one_accumulator_is_kept() -> None:
    a = {"x": torch.ones(3)}
    mean = WeightedMean()
    mean.add(a, 2.0)
    mean.add({"x": torch.zeros(3)}, 2.0)
    assert torch.equal(a["x"], torch.ones(3))
    assert mean.count == 2 and mean.total_weight == 4.0
    assert torch.equal(mean.result()["x"], torch.full((3,), 0.5))


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        weighted_mean([({"x": torch.ones(1)}, 0.0)])
    with pytest.raises(ValueError, match="of nothing"):
        weighted_mean([])
    with pytest.raises(ValueError, match="same names"):
        weighted_mean([({"x": torch.ones(1)}, 1.0), ({"y": torch.ones(1)}, 1.0)])


def test_the_running_mean_is_close_exact_for_one_and_deterministic() -> None:
    gen = torch.Generator().manual_seed(1)
    tensors = [torch.randn(10_000, generator=gen) for _ in range(20)]
    counts = [float(c) for c in range(1, 21)]
    pairs = [
        ({"x": t, "n": torch.tensor(c)}, float(c))
        for t, c in zip(tensors, range(1, 21), strict=True)
    ]
    exact = weighted_mean(pairs)
    fast = weighted_mean(pairs, exact=False)
    assert fast["x"].dtype == torch.float32 and fast["n"].dtype == torch.int64
    assert torch.allclose(fast["x"], exact["x"], rtol=0, atol=1e-6)
    assert torch.equal(fast["n"], exact["n"])  # integers always take the exact path
    assert torch.equal(weighted_mean(pairs, exact=False)["x"], fast["x"])
    one = weighted_mean([({"x": tensors[0]}, 7.0)], exact=False)
    assert torch.equal(one["x"], tensors[0])
    same = weighted_mean([({"x": tensors[0]}, 3.0), ({"x": tensors[0].clone()}, 5.0)], exact=False)
    assert torch.equal(same["x"], tensors[0])
    assert sum(counts) == 210.0


def test_the_inexact_mean_keeps_one_copy_of_the_model() -> None:
    mean = WeightedMean(exact=False)
    mean.add({"x": torch.ones(4)}, 1.0)
    assert mean._sums["x"].dtype == torch.float32  # no float64 accumulator


@pytest.mark.parametrize("block", [7, 1 << 18])
def test_the_mean_of_models_in_hand_is_the_streaming_mean_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch, block: int, fold_path: str
) -> None:
    """A list is averaged a block at a time across all models, an iterator one model at a
    time: the same sums in the same order, for every dtype, size and kind of weight."""
    monkeypatch.setattr(aggregation, "BLOCK", block)  # 7: tensors span many blocks
    gen = torch.Generator().manual_seed(1)
    models = []
    for i in range(5):
        models.append(
            {
                "w": torch.randn(9, 5, generator=gen) * 10 ** (i - 2),
                "h": torch.randn(20, generator=gen).half(),
                "d": torch.randn(30, generator=gen).double(),
                "n": torch.tensor(3 * i + 1),
                "m": torch.tensor([i % 2 == 0, True, False]),
                "z": torch.tensor([-0.0, 0.0]),
                "k": torch.arange(12) * (i + 1),  # integers and booleans over many blocks
                "f": torch.arange(12) % (i + 2) == 0,
            }
        )
    weights = [3.0, 0.1, 7.0, 1e-3, 2.5]
    in_hand = weighted_mean(list(zip(models, weights, strict=True)))
    streamed = weighted_mean(iter(zip(models, weights, strict=True)))
    assert set(in_hand) == set(streamed)
    for name, tensor in streamed.items():
        assert in_hand[name].dtype == tensor.dtype
        assert in_hand[name].numpy().tobytes() == tensor.numpy().tobytes(), name
    assert torch.equal(in_hand["z"], torch.tensor([-0.0, 0.0]))
    assert str(in_hand["z"][0].item()) == "-0.0"  # the mean of -0.0s keeps its sign
    with pytest.raises(ValueError, match="must be positive"):
        weighted_mean([(models[0], 1.0), (models[1], -1.0)])
    with pytest.raises(ValueError, match="same names"):
        weighted_mean([(models[0], 1.0), ({"w": models[1]["w"]}, 1.0)])


def decoded(model: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
    """``model`` as the server gets it: decoded from a payload, tensors viewing its data."""
    from flcore import codec

    weights, _, flat = codec.decode_flat(codec.encode(model), copy=False)
    assert flat is not None and flat.covers(weights)
    return weights, flat


def _add(mean: WeightedMean, model: dict[str, torch.Tensor], weight: float) -> None:
    weights, flat = decoded(model)
    mean.add(weights, weight, flat)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("block", [7, 1 << 16])
def test_decoded_models_are_folded_a_run_at_a_time_with_the_same_bits(
    monkeypatch: pytest.MonkeyPatch, exact: bool, block: int, fold_path: str
) -> None:
    """Models decoded from payloads of one layout are folded one dtype's run at a time; the
    mean is the tensor-by-tensor mean bit for bit, also when plain dicts come in between."""
    monkeypatch.setattr(aggregation, "BLOCK", block)
    gen = torch.Generator().manual_seed(2)
    models = [
        {
            "w": torch.randn(9, 5, generator=gen) * 10 ** (i - 2),
            "b": torch.randn(5, generator=gen),
            "h": torch.randn(20, generator=gen).bfloat16(),
            "d": torch.randn(3, 2, generator=gen).double(),
            "n": torch.tensor(3 * i + 1),
            "m": torch.tensor([i % 2 == 0, True, False]),
            "e": torch.zeros(0, 4),
        }
        for i in range(4)
    ]
    weights = [3.0, 0.1, 7.0, 2.5]
    plain = weighted_mean(iter(zip(models, weights, strict=True)), exact)
    mean = WeightedMean(exact)
    for i, (model, weight) in enumerate(zip(models, weights, strict=True)):
        if i == 2:
            mean.add(model, weight)  # the third one: a plain dict
        else:
            _add(mean, model, weight)
    runs = mean.result()
    assert set(runs) == set(plain)
    for name, tensor in plain.items():
        assert runs[name].dtype == tensor.dtype and runs[name].shape == tensor.shape
        assert torch.equal(runs[name].view(-1).view(torch.uint8), tensor.view(-1).view(torch.uint8))


def test_a_decoded_model_of_another_layout_or_edited_is_folded_tensor_by_tensor() -> None:
    first = {"a": torch.ones(3), "b": torch.full((2,), 2.0)}
    other = {"a": torch.full((3,), 3.0), "b": torch.full((2,), 4.0), "c": torch.zeros(0)}
    mean = WeightedMean()
    _add(mean, first, 1.0)
    with pytest.raises(ValueError, match="same names"):
        _add(mean, other, 1.0)
    del other["c"]
    _add(mean, {k: v.double() for k, v in other.items()}, 1.0)  # another layout
    weights, flat = decoded({"a": torch.full((3,), 5.0), "b": torch.full((2,), 6.0)})
    weights["b"] = torch.full((2,), 2.0)  # a hook replaced a tensor: the runs no longer speak
    assert not flat.covers(weights)
    mean.add(weights, 1.0, flat)
    result = mean.result()
    assert torch.equal(result["a"], torch.full((3,), 3.0))
    assert torch.equal(result["b"], torch.full((2,), 8 / 3))
    # each tensor of the mean has memory of its own: keeping one keeps no other alive
    assert [result[k].untyped_storage().nbytes() for k in "ab"] == [12, 8]
