from __future__ import annotations

from typing import Any

import pytest
import torch

from flcore import codec
from flcore.contribution import Contribution, validate
from flcore.errors import CodecError, ContributionRefused

REFERENCE = {"w": torch.zeros(2, 3), "b": torch.zeros(3), "n": torch.tensor(0)}


def contribution(**changes) -> Contribution:
    fields = {
        "client_id": "client-0",
        "round": 2,
        "weights": {k: v.clone() for k, v in REFERENCE.items()},
        "num_samples": 10,
        "local_iterations": 3,
        "metrics": {"initial_validation_metric": 0.5},
    }
    fields.update(changes)
    return Contribution(**fields)


def check(c: Contribution, received: set[str] | None = None, sent: Any = None) -> None:
    validate(
        c,
        reference=REFERENCE,
        round=2,
        clients={"client-0", "client-1"},
        received=received or set(),
        sent=sent,
    )


def test_a_good_contribution_round_trips_and_passes() -> None:
    c = contribution()
    again = Contribution.decode(c.encode(), sender="client-0")
    assert again.client_id == "client-0" and again.round == 2
    assert again.num_samples == 10 and again.local_iterations == 3
    assert again.metrics == {"initial_validation_metric": 0.5}
    assert all(torch.equal(again.weights[k], v) for k, v in REFERENCE.items())
    check(again)


def nan_weights() -> dict:
    w = {k: v.clone() for k, v in REFERENCE.items()}
    w["w"][0, 1] = float("nan")
    return w


def inf_weights() -> dict:
    w = {k: v.clone() for k, v in REFERENCE.items()}
    w["b"][2] = float("inf")
    return w


@pytest.mark.parametrize(
    ("changes", "received", "reason"),
    [
        ({"client_id": "mallory"}, set(), "unknown client 'mallory'"),
        ({"round": 1}, set(), "client-0: wrong round 1 (late; the current round is 2)"),
        ({"round": 3}, set(), "wrong round 3 (from the future"),
        ({}, {"client-0"}, "client-0: duplicate reply for round 2"),
        ({"num_samples": 0}, set(), "non-positive sample count 0"),
        ({"num_samples": -5}, set(), "non-positive sample count -5"),
        ({"local_iterations": -1}, set(), "negative local iteration count"),
        (
            {"weights": {"w": torch.zeros(2, 3), "n": torch.tensor(0)}},
            set(),
            "missing tensors ['b']",
        ),
        ({"weights": {**REFERENCE, "x": torch.zeros(1)}}, set(), "unexpected tensors ['x']"),
        (
            {"weights": {**REFERENCE, "w": torch.zeros(3, 2)}},
            set(),
            "tensor 'w' has shape (3, 2), expected (2, 3)",
        ),
        (
            {"weights": {**REFERENCE, "b": torch.zeros(3, dtype=torch.float64)}},
            set(),
            "tensor 'b' has dtype torch.float64, expected torch.float32",
        ),
        ({"weights": nan_weights()}, set(), "tensor 'w' has NaN or infinite values"),
        ({"weights": inf_weights()}, set(), "tensor 'b' has NaN or infinite values"),
    ],
)
def test_each_bad_contribution_is_refused_with_its_reason(changes, received, reason) -> None:
    with pytest.raises(ContributionRefused) as err:
        check(contribution(**changes), received)
    assert reason in str(err.value)


@pytest.mark.parametrize(
    ("meta_change", "message"),
    [
        ({"kind": "global_model"}, "payload is not a contribution"),
        ({"num_samples": "10"}, "field 'num_samples' must be int, got '10'"),
        ({"round": True}, "field 'round' must be int"),
        ({"metrics": [1]}, "field 'metrics' must be dict"),
        ({"client_id": None}, "field 'client_id' must be str"),
    ],
)
def test_malformed_contribution_fields_are_codec_errors(meta_change, message) -> None:
    from flcore import codec

    meta = {
        "kind": "contribution",
        "client_id": "client-0",
        "round": 2,
        "num_samples": 10,
        "local_iterations": 1,
        "metrics": {},
    }
    meta.update(meta_change)
    with pytest.raises(CodecError, match="contribution from client-0: " + message):
        Contribution.decode(codec.encode(REFERENCE, meta), sender="client-0")


def test_unserializable_metrics_are_an_error_on_the_client() -> None:
    with pytest.raises(CodecError, match="metrics not JSON"):
        contribution(metrics={"x": object()}).encode()


def test_dropping_weights_keeps_everything_else() -> None:
    full = contribution()
    c = full.evolve_without_weights()
    assert c.weights == {} and full.weights  # the original keeps its weights
    assert (c.client_id, c.round, c.num_samples, c.local_iterations, c.metrics) == (
        "client-0",
        2,
        10,
        3,
        {"initial_validation_metric": 0.5},
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_finite_values_whose_sum_overflows_are_still_finite(dtype) -> None:
    from flcore.contribution import all_finite

    big = torch.full((1000,), torch.finfo(dtype).max, dtype=dtype)
    assert not torch.isfinite(big.sum())  # the fast check's sum overflows...
    assert all_finite(big)  # ...and the element-wise check still says finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_one_non_finite_element_anywhere_is_found(bad, dtype) -> None:
    from flcore.contribution import all_finite

    t = torch.randn(3000, dtype=dtype)
    t[1234] = bad
    assert not all_finite(t)
    assert not all_finite(t, block=100)  # also when checked block by block
    t[1234] = 0
    assert all_finite(t) and all_finite(torch.empty(0)) and all_finite(torch.arange(5))


def test_nan_beside_an_overflowing_value_is_refused() -> None:
    w = {k: v.clone() for k, v in REFERENCE.items()}
    w["w"][0, 0] = torch.finfo(torch.float32).max
    w["w"][0, 1] = torch.finfo(torch.float32).max
    check(contribution(weights=w))  # overflowing sum, finite values: accepted
    w["w"][1, 2] = float("nan")
    with pytest.raises(ContributionRefused, match="tensor 'w' has NaN or infinite values"):
        check(contribution(weights=w))


def test_a_large_half_precision_model_takes_the_fast_check(monkeypatch) -> None:
    from flcore import contribution

    calls: list[int] = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: calls.append(t.numel()) or real(t))
    weights = torch.full((100_000,), 1000.0, dtype=torch.float16)  # sums to 1e8: over fp16
    assert contribution.all_finite(weights) and calls == []  # summed in float32: no fallback
    weights[5] = float("nan")
    assert not contribution.all_finite(weights) and calls  # a real NaN: checked element-wise


@pytest.mark.parametrize("bad", ["w", "b"])
def test_a_decoded_contribution_with_nan_is_refused_naming_the_tensor(bad: str) -> None:
    """Decoded weights are checked a dtype's run at a time; a bad run is then searched
    tensor by tensor for the name."""
    weights = {k: v.clone() for k, v in REFERENCE.items()}
    weights[bad].view(-1)[1] = float("nan")
    again = Contribution.decode(contribution(weights=weights).encode(), sender="client-0")
    assert again.flat is not None and again.flat.covers(again.weights)
    with pytest.raises(ContributionRefused, match=f"tensor '{bad}' has NaN or infinite values"):
        check(again)


def test_a_tensor_replaced_after_decoding_is_checked_itself() -> None:
    """The runs speak for the tensors decoded: one put in their place is checked on its own."""
    again = Contribution.decode(contribution().encode(), sender="client-0")
    check(again)
    again.weights["b"] = torch.tensor([0.0, float("inf"), 0.0])  # type: ignore[index]
    assert again.flat is not None and not again.flat.covers(again.weights)
    with pytest.raises(ContributionRefused, match="tensor 'b' has NaN or infinite values"):
        check(again)


def test_decoded_weights_are_a_plain_dict_that_torch_load_reads(tmp_path) -> None:
    again = Contribution.decode(contribution().encode(), sender="client-0")
    assert type(again.weights) is dict
    torch.save(again.weights, tmp_path / "w.pt")
    loaded = torch.load(tmp_path / "w.pt", weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in REFERENCE.items())
    assert again.evolve_without_weights().flat is None  # the payload is let go with them


def test_a_contribution_in_the_layout_sent_is_still_checked_for_what_may_differ() -> None:
    """Decoded in the layout the global model was sent in, its names, shapes and dtypes are
    the reference's; its values and a tensor put in after decoding are checked still."""
    codec.encode(REFERENCE, {"kind": "global_model", "round": 2})
    sent = codec.layout_of(REFERENCE)
    assert sent is not None
    good = Contribution.decode(contribution().encode(), sender="client-0")
    assert good.flat is not None and good.flat.layout is sent
    check(good, sent=sent)
    bad = Contribution.decode(contribution(weights=nan_weights()).encode(), sender="client-0")
    with pytest.raises(ContributionRefused, match="tensor 'w' has NaN or infinite values"):
        check(bad, sent=sent)
    good.weights["b"] = torch.zeros(4)  # type: ignore[index]
    with pytest.raises(ContributionRefused, match=r"tensor 'b' has shape \(4,\), expected \(3,\)"):
        check(good, sent=sent)
    wider = {**REFERENCE, "w": torch.zeros(2, 4)}
    other = Contribution.decode(contribution(weights=wider).encode(), sender="client-0")
    assert other.flat is not None and other.flat.layout is not sent
    with pytest.raises(ContributionRefused, match=r"tensor 'w' has shape \(2, 4\)"):
        check(other, sent=sent)
