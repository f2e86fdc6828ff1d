from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from flcore import codec, saved_state
from flcore.errors import CodecError


def assert_same(got: Any, want: Any) -> None:
    """Equal JSON, and tensors equal bit for bit in dtype and shape."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.is_contiguous() and not got.requires_grad
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[want.itemsize]
        if want.dtype == torch.bool:
            assert torch.equal(got, want)
        else:
            assert torch.equal(got.view(bits), want.contiguous().view(bits))
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want)
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, list | tuple):
        assert isinstance(got, list) and len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert_same(a, b)
    else:
        assert type(got) is type(want) and got == want


def example() -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "swag": {
            "n": 3,
            "mean": torch.randn(4, 3),
            "moments": [torch.randn(2, dtype=torch.float64), torch.arange(5), None],
            "mask": torch.tensor([True, False, True]),
            "half": torch.randn(3, 2).to(torch.bfloat16),
            "strided": torch.arange(12.0).reshape(3, 4).t(),
        },
        "seen": (1, 2.5, -0.0, "x", True, False),
        "empty": {"list": [], "dict": {}, "tensor": torch.empty(0, 3)},
        "big": 2**80,
    }


def test_pack_puts_each_tensor_behind_a_placeholder() -> None:
    x = torch.ones(2, requires_grad=True)
    obj, tensors = saved_state.pack({"a": x, "b": [x * 2]})
    assert obj == {"a": {"__tensor__": "t0"}, "b": [{"__tensor__": "t1"}]}
    assert set(tensors) == {"t0", "t1"}
    assert not tensors["t0"].requires_grad
    json.dumps(obj, allow_nan=False)  # pure JSON


def test_pack_then_unpack_is_exact() -> None:
    value = example()
    obj, tensors = saved_state.pack(value)
    assert_same(saved_state.unpack(obj, tensors), value)


@pytest.mark.parametrize("value", [None, 0, "", [], {}, torch.empty(0)])
def test_empty_and_scalar_values_round_trip(tmp_path: Path, value: Any) -> None:
    saved_state.save(tmp_path / "s.safetensors", value)
    got, meta = saved_state.load(tmp_path / "s.safetensors")
    assert_same(got, value)
    assert meta == {}


def test_file_round_trip_is_exact_and_keeps_meta(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "state.safetensors"
    value = example()
    saved_state.save(path, value, {"round": 7, "who": ["a"]})
    got, meta = saved_state.load(path)
    assert_same(got, value)
    assert meta == {"round": 7, "who": ["a"]}
    assert [p.name for p in path.parent.iterdir()] == ["state.safetensors"]  # no temp left


def test_saving_again_is_byte_identical(tmp_path: Path) -> None:
    saved_state.save(tmp_path / "a", example(), {"round": 1})
    saved_state.save(tmp_path / "b", example(), {"round": 1})
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"swag": {"moments": [1, 2, {3}]}}, "state['swag']['moments'][2]: a set is neither"),
        ({"loss": float("nan")}, "state['loss']: nan is not finite"),
        ([float("-inf")], "state[0]: -inf is not finite"),
        ({"a": {1: "x"}}, "state['a']: key 1 is not a str"),
        ({"a": {"__tensor__": "t0"}}, "state['a']: the key '__tensor__' is reserved"),
        ({"p": Path("x")}, "state['p']: a PosixPath is neither JSON nor a tensor"),
        ({"b": b"x"}, "state['b']: a bytes is neither"),
        ([torch.zeros(2, dtype=torch.complex64)], "state[0]: a tensor of dtype torch.complex64"),
        ([torch.zeros(2).to_sparse()], "state[0]: a torch.sparse_coo tensor"),
        ([torch.zeros(2, device="meta")], "state[0]: a torch.strided tensor on meta"),
    ],
)
def test_pack_refuses_what_it_cannot_store_exactly(value: Any, message: str) -> None:
    with pytest.raises(CodecError, match=re.escape(message)):
        saved_state.pack(value)


def test_pack_refuses_a_value_that_contains_itself() -> None:
    loop: list[Any] = [1]
    loop.append({"again": loop})
    with pytest.raises(CodecError, match=re.escape("state[1]['again']: contains itself")):
        saved_state.pack(loop)
    shared = [1]
    assert saved_state.pack([shared, shared])[0] == [[1], [1]]  # shared is not a loop


def test_save_refuses_bad_meta(tmp_path: Path) -> None:
    with pytest.raises(CodecError, match="meta: must be a dict"):
        saved_state.save(tmp_path / "s", 1, {"t": torch.zeros(1)})
    with pytest.raises(CodecError, match=re.escape("meta['x']: nan is not finite")):
        saved_state.save(tmp_path / "s", 1, {"x": float("nan")})
    assert not (tmp_path / "s").exists()


T = {"t0": torch.zeros(1)}


@pytest.mark.parametrize(
    ("obj", "tensors", "message"),
    [
        ({"a": {"__tensor__": "t9"}}, T, "state['a']: the placeholder names 't9', which is not"),
        ({"__tensor__": 0}, T, "state: the placeholder names 0"),
        ({"__tensor__": "t0", "x": 1}, T, "state: a tensor placeholder with other keys"),
        (
            [{"__tensor__": "t0"}, {"__tensor__": "t0"}],
            T,
            "state[1]: tensor 't0' is named a second",
        ),
        ([], T, "state: tensors ['t0'] are held but no placeholder names them"),
        ([(1, 2)], {}, "state[0]: a tuple is not JSON"),
        ({"x": float("inf")}, {}, "state['x']: inf is not finite"),
        ({1: 2}, {}, "state: key 1 is not a str"),
        ([], [], "tensors: a list, not a dict"),
        ([], {"t0": [1]}, "tensor 't0': a list, not a tensor"),
    ],
)
def test_unpack_refuses_what_pack_never_writes(obj: Any, tensors: Any, message: str) -> None:
    with pytest.raises(CodecError, match=re.escape(message)):
        saved_state.unpack(obj, tensors)


def test_unpack_refuses_deep_nesting_with_a_codec_error() -> None:
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(CodecError, match="nested too deeply"):
        saved_state.unpack(deep, {})
    with pytest.raises(CodecError, match="nested too deeply"):
        saved_state.pack(deep)


def written(tmp_path: Path) -> Path:
    path = tmp_path / "state.safetensors"
    saved_state.save(path, example(), {"round": 1})
    return path


def with_metadata(
    path: Path, metadata: Any, tensors: dict[str, torch.Tensor] | None = None
) -> Path:
    """A safetensors file whose flcore metadata is ``metadata``, as a hand edit leaves it."""
    codec.save_file(path, tensors or {}, metadata)
    return path


def test_load_of_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(CodecError, match=r"cannot read .*nothing\.safetensors"):
        saved_state.load(tmp_path / "nothing.safetensors")


@pytest.mark.parametrize("keep", [0, 7, 100, -3])
def test_load_of_a_truncated_file_names_it(tmp_path: Path, keep: int) -> None:
    path = written(tmp_path)
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(CodecError, match=r"state\.safetensors.*truncated"):
        saved_state.load(path)


@pytest.mark.parametrize(
    "data",
    [
        b"\x00" * 64,
        b"not a safetensors file at all, just text",
        (12).to_bytes(8, "little") + b"[1, 2, 3]   ",
        (24).to_bytes(8, "little") + b'{"t0": {"dtype": [1]}}  ',
        (20).to_bytes(8, "little") + b"[" * 20,
    ],
)
def test_load_of_garbage_names_the_file(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "state.safetensors"
    path.write_bytes(data)
    with pytest.raises(CodecError, match=r"state\.safetensors"):
        saved_state.load(path)


def test_load_of_deeply_nested_metadata_is_a_codec_error(tmp_path: Path) -> None:
    header = json.dumps({"__metadata__": {"flcore": "[" * 100_000}}).encode()
    path = tmp_path / "state.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CodecError, match=r"state\.safetensors"):
        saved_state.load(path)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (None, "metadata is not saved state"),
        ({"state": 1}, "metadata is not saved state"),
        ({"state": 1, "meta": [], "x": 2}, "metadata is not saved state"),
        ({"state": 1, "meta": []}, "metadata is not saved state"),
        ({"state": {"__tensor__": "t1"}, "meta": {}}, "state: the placeholder names 't1'"),
        ({"state": [1, float("nan")], "meta": {}}, "state[1]: nan is not finite"),
        ({"state": 1, "meta": {"x": {"__tensor__": "t0"}}}, "meta['x']: the placeholder"),
    ],
)
def test_load_of_hand_edited_metadata_names_the_file_and_the_problem(
    tmp_path: Path, metadata: Any, message: str
) -> None:
    path = with_metadata(tmp_path / "state.safetensors", metadata)
    with pytest.raises(CodecError, match=r"state\.safetensors'?: " + re.escape(message)):
        saved_state.load(path)


def test_load_refuses_a_file_that_holds_a_tensor_nothing_names(tmp_path: Path) -> None:
    path = with_metadata(tmp_path / "s", {"state": [], "meta": {}}, {"t0": torch.zeros(1)})
    with pytest.raises(CodecError, match="no placeholder names them"):
        saved_state.load(path)
