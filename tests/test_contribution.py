from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from flcore import codec, hookimpl
from flcore.contribution import Contribution, validate
from flcore.errors import CodecError, ContributionRefused
from flcore.run import run_job
from flcore.runtime.base import ClientResult
from flcore.runtime.embedded import EmbeddedRuntime
from tests.conftest import small_job

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


# -- counts and metrics that let one forged reply crash or steer a round (issue 17) --------


def nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        (
            {"num_samples": 10**400},
            "client-0: sample count 1000000000000000000000000000000000000... is above "
            "1000000000 ([job] max_samples_per_client)",
        ),
        ({"num_samples": 10**9 + 1}, "client-0: sample count 1000000001 is above 1000000000"),
        ({"num_samples": 1e12}, "client-0: sample count 1000000000000.0 is not an integer"),
        ({"num_samples": True}, "client-0: sample count True is not an integer"),
        ({"local_iterations": 10**9 + 1}, "local iteration count 1000000001 is above 1000000000"),
        ({"local_iterations": False}, "local iteration count False is not an integer"),
        ({"metrics": {"loss": float("nan")}}, "client-0: metrics.loss is not finite (nan)"),
        ({"metrics": {"loss": float("-inf")}}, "metrics.loss is not finite (-inf)"),
        ({"metrics": {"loss": -1e13}}, "metrics.loss is -10000000000000.0, beyond ±1e+12"),
        (
            {"metrics": {"loss": 10**400}},
            "metrics.loss is 1000000000000000000000000000000000000...",
        ),
        (
            {"metrics": {"initial_validation": {"accuracy": 1e308}}},
            "metrics.initial_validation.accuracy is 1e+308, beyond ±1e+12",
        ),
        ({"metrics": {"x": [0.5, float("nan")]}}, "metrics.x[1] is not finite (nan)"),
        ({"metrics": {"x": {"y": [{"z": 1e13}]}}}, "metrics.x.y[0].z is 10000000000000.0, beyond"),
        ({"metrics": {"x": nested(64)}}, "is nested deeper than 64 levels"),
    ],
)
def test_counts_and_metrics_out_of_bounds_are_refused_with_their_reason(changes, reason) -> None:
    with pytest.raises(ContributionRefused) as err:
        check(contribution(**changes))
    assert reason in str(err.value)


def test_counts_and_metrics_within_bounds_pass() -> None:
    check(contribution(num_samples=10**9, local_iterations=10**9, metrics={}))
    metrics = {
        "train_loss": 1e12,
        "initial_validation_metric": None,  # what a client without validation data sends
        "initial_validation": {"loss": -0.5, "accuracy": 1},
        "losses": [0.5, 0.25],
        "optimizer": "sgd",  # a report that no mean counts
        "converged": True,
        "deep": nested(63),
    }
    check(contribution(metrics=metrics))


def test_the_job_sets_the_bound_on_sample_counts() -> None:
    big = contribution(num_samples=5 * 10**9)
    with pytest.raises(ContributionRefused, match="above 1000000000"):
        check(big)
    validate(
        big, reference=REFERENCE, round=2, clients={"client-0"}, received=set(), max_samples=10**10
    )
    with pytest.raises(ContributionRefused, match=r"sample count 11 is above 10 \(\[job\]"):
        validate(
            contribution(num_samples=11),
            reference=REFERENCE,
            round=2,
            clients={"client-0"},
            received=set(),
            max_samples=10,
        )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "must be >= 1, got 0"),
        (2**53 + 1, "must be <= 9007199254740992"),
        (True, "expected int, got bool"),
        (1e9, "expected int, got float"),
    ],
)
def test_max_samples_per_client_is_a_count_a_float_weight_holds(value: Any, message: str) -> None:
    from flcore.errors import JobError

    assert small_job().job.max_samples_per_client == 10**9
    with pytest.raises(JobError, match=re.escape(f"[job].max_samples_per_client: {message}")):
        small_job(job={"max_samples_per_client": value})


def test_a_decoded_count_that_is_a_float_or_a_bool_is_a_codec_error() -> None:
    meta = {
        "kind": "contribution",
        "client_id": "client-0",
        "round": 2,
        "num_samples": 1e12,
        "local_iterations": 1,
        "metrics": {},
    }
    with pytest.raises(CodecError, match=r"field 'num_samples' must be int, got 1000000000000\.0"):
        Contribution.decode(codec.encode(REFERENCE, meta), sender="client-0")
    with pytest.raises(CodecError, match="field 'local_iterations' must be int, got True"):
        meta.update(num_samples=10, local_iterations=True)
        Contribution.decode(codec.encode(REFERENCE, meta), sender="client-0")


def test_a_decoded_count_of_10_to_the_400_is_refused_before_anything_sums_it() -> None:
    forged = codec.encode(
        REFERENCE,
        {
            "kind": "contribution",
            "client_id": "client-0",
            "round": 2,
            "num_samples": 10**400,
            "local_iterations": 1,
            "metrics": {"accuracy": float("inf")},
        },
    )
    with pytest.raises(ContributionRefused, match=r"sample count 1000+\.\.\. is above"):
        check(Contribution.decode(forged, sender="client-0"))


# -- end to end: forged replies are refused and the run finishes with the honest clients --


def forge_header(payload: bytes, edit: Any) -> bytes:
    """``payload`` with its header rewritten by ``edit(header) -> JSON text``; the data kept
    8-byte aligned, so that a header whose entries are the server's own still takes the
    remembered-header path."""
    size = int.from_bytes(payload[:8], "little")
    header, data = json.loads(payload[8 : 8 + size]), payload[8 + size :]
    text = edit(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def with_meta(text: Any) -> Any:
    """An edit that replaces the flcore metadata by ``text(meta)``, the entries untouched."""

    def edit(header: dict[str, Any]) -> str:
        meta = json.loads(header["__metadata__"]["flcore"])
        header["__metadata__"] = {"flcore": text(meta)}
        return json.dumps(header, separators=(",", ":"))

    return edit


def huge_count(meta: dict[str, Any]) -> str:
    return json.dumps({**meta, "num_samples": 10**400})


def nested_metrics(meta: dict[str, Any]) -> str:
    deep = "[" * 100_000 + "]" * 100_000
    return json.dumps({**meta, "metrics": {}})[:-1] + f',"nested":{{"m":{deep}}}}}'


def huge_shape(header: dict[str, Any]) -> str:
    header["0.weight"]["shape"] = [0, 2**70]
    return json.dumps(header, separators=(",", ":"))


def validation(change: dict[str, Any]) -> Any:
    def text(meta: dict[str, Any]) -> str:
        meta = {**meta, **change}
        if "accuracy" in change:
            meta["results"] = {"global": {**meta["results"]["global"], **change}}
            del meta["accuracy"]
        return json.dumps(meta)

    return with_meta(text)


#: client-1's forged replies, by request and round: the issue's exact inputs.
FORGED = {
    ("train", 1): with_meta(huge_count),
    ("train", 2): with_meta(nested_metrics),
    ("train", 3): huge_shape,
    ("validate", 1): validation({"num_samples": True}),
    ("validate", 2): validation({"accuracy": 1e308}),
    ("validate", 3): validation({"num_samples": -1}),
}


class ForgingRuntime(EmbeddedRuntime):
    """The embedded runtime, where client-1's every reply is forged (``forged``) or, for
    the run to compare with, fails."""

    def __init__(self, forged: bool) -> None:
        super().__init__()
        self.forged = forged

    def run(self, ctx: Any, request: str, payload: Any, clients: Any) -> Any:
        for result in super().run(ctx, request, payload, clients):
            if result.client_id == "client-1" and result.payload is not None:
                edit = FORGED[(request, ctx.round)]
                forged = forge_header(bytes(result.payload), edit) if self.forged else None
                result = ClientResult("client-1", forged, None if self.forged else "gone")
            yield result


class Runtime:
    def __init__(self, forged: bool) -> None:
        self.forged = forged

    @hookimpl
    def get_runtime(self, ctx: Any) -> Any:
        return ForgingRuntime(self.forged)


def test_forged_replies_are_refused_and_the_run_finishes_with_the_honest_clients(
    tmp_path: Path,
) -> None:
    """A count of 10**400, metrics nested 100,000 deep and a shape [0, 2**70] each crashed
    a server; a boolean or negative count and an accuracy of 1e308 in a validation reply
    were counted. Each is refused with its reason, and the run ends with the model of a
    run where client-1 never answered."""
    job = small_job(["forge"], job={"rounds": 3, "min_clients": 2})
    runs = {}
    for forged in (True, False):
        runs[forged] = run_job(
            job, out=tmp_path / str(forged), extra_plugins={"forge": Runtime(forged)}
        )
    result = runs[True]
    assert [m["clients"] for m in result.history] == [["client-0", "client-2"]] * 3
    log = [json.loads(line) for line in (result.run_dir / "events.jsonl").read_text().splitlines()]
    refused = [e for e in log if e["event"] == "contribution_refused"]
    assert [e["client"] for e in refused] == ["client-1"] * 3
    for event, reason in zip(
        refused,
        [
            "client-1: sample count 1000000000000000000000000000000000000... is above "
            "1000000000 ([job] max_samples_per_client)",
            "contribution from client-1: malformed metadata: nested deeper than 64 levels",
            "contribution from client-1: tensor '0.weight' has a malformed shape "
            "[0, 1180591620717411303424]",
        ],
        strict=True,
    ):
        assert reason in event["reason"]
    tests = [e for e in log if e["event"] == "test_result_refused"]
    assert [e["client"] for e in tests] == ["client-1"] * 3
    for event, reason in zip(
        tests,
        [
            "validation results from client-1: num_samples True is not a count in [1, 1000000000]",
            "validation results from client-1: global.accuracy is 1e+308, beyond ±1e+12",
            "validation results from client-1: num_samples -1 is not a count in [1, 1000000000]",
        ],
        strict=True,
    ):
        assert reason in event["reason"]
    honest = runs[False]
    assert result.global_model_path.read_bytes() == honest.global_model_path.read_bytes()
    assert [m["test"] for m in result.history] == [m["test"] for m in honest.history]
