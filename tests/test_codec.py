from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest
import torch

from flcore import codec
from flcore.errors import CodecError


def model_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return dict(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).state_dict())


def test_round_trip_keeps_names_values_dtypes_and_metadata() -> None:
    weights = model_weights()
    got, meta = codec.decode(codec.encode(weights, {"round": 3, "m": {"a": [1, 2]}}))
    assert meta == {"round": 3, "m": {"a": [1, 2]}}
    assert set(got) == set(weights)
    for name, tensor in weights.items():
        assert got[name].dtype == tensor.dtype
        assert torch.equal(got[name], tensor)


def test_tied_and_non_contiguous_tensors_are_written() -> None:
    base = torch.arange(6.0).reshape(2, 3)
    got, _ = codec.decode(codec.encode({"a": base, "b": base, "t": base.t()}))
    assert torch.equal(got["a"], base) and torch.equal(got["b"], base)
    assert torch.equal(got["t"], base.t())


def test_nan_metadata_survives_so_that_plugins_can_judge_it() -> None:
    _, meta = codec.decode(codec.encode({}, {"metric": float("nan")}))
    assert meta["metric"] != meta["metric"]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "truncated (0 bytes"),
        (b"\x05\x00", "truncated (2 bytes"),
        ((10_000).to_bytes(8, "little") + b"{}", "header says 10000 bytes, 2 follow"),
        ((4).to_bytes(8, "little") + b"{{{{", "malformed header"),
        ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
    ],
)
def test_malformed_payloads_are_clear_errors(payload: bytes, message: str) -> None:
    with pytest.raises(CodecError, match="payload: .*" + message.replace("(", r"\(")):
        codec.decode(payload)


def test_a_truncated_payload_is_refused() -> None:
    payload = codec.encode(model_weights())
    for cut in (len(payload) - 1, len(payload) // 2, 9):
        with pytest.raises(CodecError, match=r"truncated|malformed"):
            codec.decode(payload[:cut], what="global model")


def test_bad_metadata_is_refused() -> None:
    from safetensors.torch import save

    payload = save({"w": torch.zeros(2)}, metadata={"flcore": "{not json"})
    with pytest.raises(CodecError, match="malformed metadata"):
        codec.decode(payload)
    payload = save({"w": torch.zeros(2)}, metadata={"flcore": "[1]"})
    with pytest.raises(CodecError, match="not a JSON object"):
        codec.decode(payload)


def test_a_pickle_is_not_a_payload() -> None:
    import pickle

    with pytest.raises(CodecError):
        codec.decode(pickle.dumps({"w": [1, 2, 3]}))


def test_non_bytes_are_refused() -> None:
    with pytest.raises(CodecError, match="expected bytes, got str"):
        codec.decode("abc")  # type: ignore[arg-type]


def test_files_are_written_atomically_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "model.safetensors"
    codec.save_file(path, model_weights(), {"round": 1})
    codec.save_file(path, model_weights(), {"round": 2})
    _, meta = codec.load_file(path)
    assert meta == {"round": 2}
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp files left


def test_a_truncated_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    codec.save_file(path, model_weights())
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CodecError, match=f"{path}: .*truncated"):
        codec.load_file(path)
    with pytest.raises(CodecError, match="cannot read"):
        codec.load_file(tmp_path / "missing.safetensors")


def test_a_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    codec.save_file(path, model_weights(), {"round": 1})
    with pytest.raises(TypeError):
        codec.save_file(path, model_weights(), {"round": object()})
    assert codec.load_file(path)[1] == {"round": 1}
    assert json.loads(json.dumps(codec.load_file(path)[1])) == {"round": 1}


def test_payloads_are_safetensors_both_ways() -> None:
    from safetensors.torch import load, save

    weights = {
        "a": torch.randn(3, 2),
        "b": torch.arange(4, dtype=torch.int64),
        "c": torch.tensor(True),
        "d": torch.randn(2).to(torch.bfloat16),
    }
    theirs = load(bytes(codec.encode(weights, {"round": 1})))
    ours, meta = codec.decode(save(weights, metadata={"flcore": '{"round": 2}'}))
    assert meta == {"round": 2}
    for name, tensor in weights.items():
        assert torch.equal(theirs[name], tensor) and torch.equal(ours[name], tensor)


def test_decoding_without_copy_shares_the_payload_and_with_copy_does_not() -> None:
    payload = codec.encode({"w": torch.zeros(4)})
    shared, _ = codec.decode(payload, copy=False)
    private, _ = codec.decode(payload)
    shared["w"].add_(1)
    assert torch.equal(codec.decode(payload)[0]["w"], torch.ones(4))
    assert torch.equal(private["w"], torch.zeros(4))
    readonly, _ = codec.decode(bytes(payload), copy=False)  # bytes cannot be shared: copied
    readonly["w"].add_(1)


def _with_header(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        (
            {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}},
            b"\0" * 8,
            "unknown dtype 'C64'",
        ),
        (
            {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
            b"\0" * 4,
            "malformed shape",
        ),
        (
            {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}},
            b"\0" * 4,
            "malformed data offsets",
        ),
        (
            {"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
            b"\0" * 4,
            "malformed shape",
        ),
        (
            {"w": {"dtype": "F32", "shape": [1], "data_offsets": [False, 4]}},
            b"\0" * 4,
            "malformed data offsets",
        ),
        (
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
            b"\0" * 4,
            "4 bytes for shape [2]",
        ),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 4, "lies outside"),
        (
            {
                "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "v": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            },
            b"\0" * 4,
            "does not follow",
        ),
        (
            {"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
            b"\0" * 8,
            "does not follow",
        ),
        (
            {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
            b"\0" * 8,
            "8 data bytes, 4 described",
        ),
        ({"w": 3}, b"", "entry 'w' is not an object"),
        ({"__metadata__": [1]}, b"", "malformed metadata"),
    ],
)
def test_malformed_tensor_tables_are_refused(header: dict, data: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=re.escape(message)):
        codec.decode(_with_header(header, data))


def test_damaged_payloads_only_ever_raise_codec_errors() -> None:
    import random

    payload = bytes(codec.encode(model_weights(), {"round": 1}))
    rng = random.Random(0)
    for _ in range(300):
        damaged = bytearray(payload)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        cut = rng.choice([len(damaged), rng.randrange(len(damaged) + 1)])
        with contextlib.suppress(CodecError):
            codec.decode(bytes(damaged[:cut]))


def test_a_file_holds_exactly_the_payload(tmp_path: Path) -> None:
    weights = {
        **model_weights(),
        "flag": torch.tensor([True, False]),
        "half": torch.ones(3, dtype=torch.bfloat16),
        "empty": torch.zeros(0),
    }
    codec.save_file(tmp_path / "m.safetensors", weights, {"round": 4})
    assert (tmp_path / "m.safetensors").read_bytes() == bytes(codec.encode(weights, {"round": 4}))


@pytest.mark.parametrize("copy", [True, False])
def test_unaligned_tensors_of_another_writer_are_read_correctly(copy: bool) -> None:
    """A float32 tensor two bytes into the data (after a float16) and a header whose length
    is not a multiple of 8: legal safetensors that our own writer never produces."""
    half = torch.tensor([1.5], dtype=torch.float16)
    full = torch.tensor([2.25, -3.0], dtype=torch.float32)
    header = {
        "a": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [2, 10]},
    }
    text = json.dumps(header).encode() + b"  x"[:1]  # an odd header length
    payload = bytearray(len(text).to_bytes(8, "little") + text)
    payload += half.view(torch.uint8).numpy().tobytes() + full.view(torch.uint8).numpy().tobytes()
    weights, _ = codec.decode(payload, copy=copy)
    assert torch.equal(weights["a"], half) and torch.equal(weights["b"], full)
    assert weights["b"].data_ptr() % 4 == 0  # copied to an aligned buffer where it was not


def test_headers_are_cached_by_shape_but_carry_each_payloads_metadata() -> None:
    weights = model_weights()
    one = codec.encode(weights, {"round": 1})
    two = codec.encode({k: v + 1 for k, v in weights.items()}, {"round": 2, "x": 'é"'})
    (w1, m1), (w2, m2) = codec.decode(one), codec.decode(two)
    assert m1 == {"round": 1} and m2 == {"round": 2, "x": 'é"'}
    assert all(torch.equal(w2[k], w1[k] + 1) for k in weights)
    other = codec.encode({"w": torch.zeros(2, 2, dtype=torch.int64)}, {})
    assert codec.decode(other)[0]["w"].dtype == torch.int64


def mixed_weights() -> dict[str, torch.Tensor]:
    return {
        **model_weights(),
        "flag": torch.tensor([True, False]),
        "half": torch.arange(3, dtype=torch.bfloat16),
        "wide": torch.arange(4, dtype=torch.float64).reshape(2, 2),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(7, dtype=torch.int32),
    }


@pytest.mark.parametrize("copy", [True, False])
def test_a_header_this_process_wrote_is_read_without_parsing_its_tensors_again(
    monkeypatch: pytest.MonkeyPatch, copy: bool
) -> None:
    """A client's reply has the entries of the global model the server wrote: the decoder
    knows them and checks only the metadata and the data's length."""
    weights = mixed_weights()
    payload = codec.encode(weights, {"round": 9})

    def no_parsing(*args: object) -> None:
        raise AssertionError("the known header's entries were parsed again")

    monkeypatch.setattr(codec, "_span", no_parsing)
    got, meta = codec.decode(payload, copy=copy)
    assert meta == {"round": 9}
    for name, tensor in weights.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)
    monkeypatch.setattr(codec, "_KNOWN", {})  # another process's header: parsed and checked
    with pytest.raises(AssertionError, match="parsed again"):
        codec.decode(payload, copy=copy)


def test_a_known_header_with_other_padding_or_a_broken_metadata_string_is_checked() -> None:
    weights = mixed_weights()
    payload = bytes(codec.encode(weights, {"round": 1}))
    size = int.from_bytes(payload[:8], "little")
    header, data = payload[8 : 8 + size], payload[8 + size :]
    # three more spaces: legal, but the data no longer starts 8-byte aligned
    padded = header + b"   "
    got, _ = codec.decode(bytearray((size + 3).to_bytes(8, "little") + padded + data), copy=False)
    assert all(torch.equal(got[k], v) for k, v in weights.items())
    broken = header.replace(b'{\\"round\\":1}', b'{\\"round\\":\\q}')
    assert broken != header
    with pytest.raises(CodecError, match="malformed header"):
        codec.decode(len(broken).to_bytes(8, "little") + broken + data)


# -- a hostile header: every one of these crashed a deployed server before (issue 17) ------


def _header_text(text: str, data: bytes = b"") -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(8, "little") + raw + data


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (_header_text(DEEP), "malformed header: nested deeper than 64 levels"),
        (_header_text('{"w":' + DEEP + "}"), "malformed header: nested deeper than 64 levels"),
        (
            _with_header({"__metadata__": {"flcore": DEEP}}),
            "malformed metadata: nested deeper than 64 levels",
        ),
        (
            _with_header({"__metadata__": {"flcore": '{"metrics":' + DEEP + "}"}}),
            "malformed metadata: nested deeper than 64 levels",
        ),
        (
            _with_header({"w": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}),
            "tensor 'w' has a malformed shape [0, 1180591620717411303424]",
        ),
        (
            _with_header(
                {"w": {"dtype": "F32", "shape": [2**61, 2**61, 0], "data_offsets": [0, 0]}}
            ),
            "tensor 'w' has a malformed shape",
        ),
        (
            _with_header(
                {"w": {"dtype": "F32", "shape": [0, 2**40, 2**40], "data_offsets": [0, 0]}}
            ),
            "tensor 'w' has a malformed shape",
        ),
        (
            _with_header(
                {"w": {"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4
            ),
            "tensor 'w' has unknown dtype {'F32': 1}",
        ),
        (
            _with_header(
                {"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4
            ),
            "tensor 'w' has unknown dtype ['F32']",
        ),
        (
            _with_header({"w": {"dtype": 3, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "tensor 'w' has unknown dtype 3",
        ),
        (
            _with_header({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 4),
            "malformed or truncated tensors: 'w' lies outside the 4 data bytes",
        ),
        (
            _header_text('{"w":{"dtype":"F32","shape":[' + "9" * 5000 + '],"data_offsets":[0,4]}}'),
            "malformed header: Exceeds the limit (4300 digits)",
        ),
        (_header_text("{}")[:8] + b"\xff\xfe", "malformed header: not UTF-8 at byte 0"),
        (
            _with_header({"__metadata__": {"flcore": "{}", "format": 1}}),
            "malformed metadata: not a JSON object of strings",
        ),
    ],
)
def test_hostile_headers_are_refused_with_their_reason(payload: bytes, message: str) -> None:
    with pytest.raises(CodecError) as info:
        codec.decode(payload)
    assert f"payload: {message}" in str(info.value)


def test_nested_metadata_in_a_remembered_header_is_refused_too() -> None:
    """The fast path reads only the metadata string of a header this process wrote: it is
    checked as the full parse checks it."""
    payload = bytes(codec.encode(model_weights(), {"round": 1}))
    size = int.from_bytes(payload[:8], "little")
    header, data = payload[8 : 8 + size], payload[8 + size :]
    head = b'{"__metadata__":{"flcore":'
    end = header.index(b'"}', len(head)) + 1
    nested = head + json.dumps(DEEP).encode() + header[end:]
    nested += b" " * (-len(nested) % 8)
    assert header[end:].rstrip() in nested and len(nested) % 8 == 0
    with pytest.raises(CodecError, match="malformed metadata: nested deeper than 64 levels"):
        codec.decode(len(nested).to_bytes(8, "little") + nested + data)


def test_empty_tensors_of_different_dtypes_may_share_an_offset() -> None:
    """Legal safetensors: sorting their spans once compared the dtypes (a TypeError)."""
    header = {
        "a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
        "b": {"dtype": "I64", "shape": [0, 3], "data_offsets": [0, 0]},
        "c": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]},
    }
    got, _ = codec.decode(_with_header(header, b"\0\0"))
    assert got["b"].shape == (0, 3) and got["b"].dtype == torch.int64
    assert got["c"].dtype == torch.float16


def test_metadata_nested_too_deeply_is_refused_when_written() -> None:
    """What the codec writes it reads back: metadata 65 levels deep is never written."""

    def nested(levels: int) -> list:
        value: list = []
        for _ in range(levels - 1):
            value = [value]
        return value

    with pytest.raises(CodecError, match="metadata nested deeper than 64 levels"):
        codec.encode({}, {"m": nested(64)})
    assert codec.decode(codec.encode({}, {"m": nested(63)}))[1] == {"m": nested(63)}


def test_a_memoryview_of_wider_items_is_refused() -> None:
    import array

    view = memoryview(array.array("i", [0] * 8))
    with pytest.raises(CodecError, match="expected contiguous bytes, got a memoryview of i"):
        codec.decode(view)
    assert codec.decode(memoryview(bytearray(codec.encode(model_weights()))))[0]


@pytest.mark.parametrize(
    ("text", "within"),
    [
        ("[" * 64 + "]" * 64, True),
        ("[" * 65 + "]" * 65, False),
        ('{"a":' * 65 + "1" + "}" * 65, False),
        (json.dumps(["[" * 100, "{" * 100]), True),  # inside strings
        ('["\\"' + "[" * 100 + '"]', True),  # after an escaped quote: still a string
        ('["\\\\"' + ",[" * 70 + "]" * 70 + "]", False),  # an escaped backslash ends it
        ("[]" * 1000, True),
        ("", True),
    ],
)
def test_nesting_is_measured_outside_strings(text: str, within: bool) -> None:
    assert codec.nesting_within(text) is within
    assert codec.nesting_within(text.encode()) is within
