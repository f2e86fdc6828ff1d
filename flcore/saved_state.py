"""State that holds tensors as well as JSON (a plugin's, a client's), kept in one safetensors file.

A value is split in two (:func:`pack`): its JSON, in which each tensor is replaced by a
placeholder ``{"__tensor__": key}``, and the tensors by key. Both go into one safetensors
file, the JSON in its metadata, so nothing is ever pickled and a file is read without
running code. Reading is total: whatever a file holds, it gives the value or a
:class:`~flcore.errors.CodecError` naming what was wrong.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from flcore import codec
from flcore.errors import CodecError

#: The key of a tensor placeholder; a dict of the caller's own may not use it.
TENSOR_KEY = "__tensor__"


def pack(value: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(JSON, tensors)`` of ``value``: tuples become lists, each tensor a placeholder.

    Tensors are kept detached, contiguous and on the CPU (not copied when they already
    are). Anything JSON cannot hold exactly is refused with the path to it."""
    return _split(value, "state")


def unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The value :func:`pack` split into ``obj`` and ``tensors``.

    Every placeholder must name one of ``tensors``, each tensor exactly once: anything else
    is not what :func:`pack` wrote."""
    return _join(obj, tensors, "state")


def save(path: Path, value: Any, meta: dict[str, Any] | None = None) -> None:
    """Write ``value`` and the caller's JSON ``meta`` to ``path`` atomically (a crash leaves
    the old file or the new one), creating its directory."""
    state, tensors = pack(value)
    extra, stray = _split({} if meta is None else meta, "meta")
    if stray or not isinstance(extra, dict):
        raise CodecError("meta: must be a dict of JSON values, without tensors")
    codec.save_file(path, tensors, {"state": state, "meta": extra})


def load(path: Path) -> tuple[Any, dict[str, Any]]:
    """``(value, meta)`` of a file :func:`save` wrote; a missing, truncated or altered file
    raises :class:`~flcore.errors.CodecError` naming it."""
    try:
        tensors, header = codec.load_file(path)
    except (TypeError, RecursionError) as err:  # holes in the codec's checks: still a bad file
        raise CodecError(f"{str(path)!r}: malformed header: {err}") from err
    except CodecError as err:
        message = str(err)
        raise (err if str(path) in message else CodecError(f"{str(path)!r}: {message}")) from err
    if set(header) != {"state", "meta"} or not isinstance(header["meta"], dict):
        raise CodecError(
            f"{str(path)!r}: metadata is not saved state "
            f"(expected 'state' and a 'meta' object, found keys {sorted(header)})"
        )
    try:
        return unpack(header["state"], tensors), _join(header["meta"], {}, "meta")
    except CodecError as err:
        raise CodecError(f"{str(path)!r}: {err}") from err


def _split(value: Any, root: str) -> tuple[Any, dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    try:
        return _pack(value, root, tensors, set()), tensors
    except RecursionError:
        raise CodecError(f"{root}: nested too deeply") from None


def _join(obj: Any, tensors: dict[str, torch.Tensor], root: str) -> Any:
    if not isinstance(tensors, dict):
        raise CodecError(f"tensors: a {type(tensors).__name__}, not a dict")
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise CodecError(f"tensor {key!r}: a {type(tensor).__name__}, not a tensor")
    used: set[str] = set()
    try:
        value = _unpack(obj, root, tensors, used)
    except RecursionError:
        raise CodecError(f"{root}: nested too deeply") from None
    unused = sorted(set(tensors) - used)
    if unused:
        raise CodecError(f"{root}: tensors {unused} are held but no placeholder names them")
    return value


def _pack(value: Any, path: str, tensors: dict[str, torch.Tensor], inside: set[int]) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CodecError(f"{path}: {value!r} is not finite (JSON has no NaN or infinity)")
        return float(value)
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = _plain(value, path)
        return {TENSOR_KEY: key}
    if not isinstance(value, list | tuple | dict):
        name = type(value).__name__
        article = "an" if name[:1].lower() in "aeiou" else "a"
        raise CodecError(f"{path}: {article} {name} is neither JSON nor a tensor")
    if id(value) in inside:
        raise CodecError(f"{path}: contains itself")
    inside.add(id(value))
    if isinstance(value, dict):
        out: Any = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CodecError(f"{path}: key {key!r} is not a str")
            if key == TENSOR_KEY:
                raise CodecError(f"{path}: the key {TENSOR_KEY!r} is reserved for tensors")
            out[key] = _pack(item, f"{path}[{key!r}]", tensors, inside)
    else:
        out = [_pack(item, f"{path}[{i}]", tensors, inside) for i, item in enumerate(value)]
    inside.discard(id(value))
    return out


def _unpack(obj: Any, path: str, tensors: dict[str, torch.Tensor], used: set[str]) -> Any:
    if obj is None or type(obj) in (bool, int, str):
        return obj
    if type(obj) is float:
        if not math.isfinite(obj):
            raise CodecError(f"{path}: {obj!r} is not finite")
        return obj
    if type(obj) is list:
        return [_unpack(item, f"{path}[{i}]", tensors, used) for i, item in enumerate(obj)]
    if type(obj) is not dict:
        raise CodecError(f"{path}: a {type(obj).__name__} is not JSON")
    if TENSOR_KEY in obj:
        key = obj[TENSOR_KEY]
        if len(obj) != 1:
            raise CodecError(f"{path}: a tensor placeholder with other keys {list(obj)}")
        if not isinstance(key, str) or key not in tensors:
            raise CodecError(f"{path}: the placeholder names {key!r}, which is not a tensor held")
        if key in used:
            raise CodecError(f"{path}: tensor {key!r} is named a second time")
        used.add(key)
        return tensors[key]
    out = {}
    for key, item in obj.items():
        if not isinstance(key, str):
            raise CodecError(f"{path}: key {key!r} is not a str")
        out[key] = _unpack(item, f"{path}[{key!r}]", tensors, used)
    return out


def _plain(tensor: torch.Tensor, path: str) -> torch.Tensor:
    """The tensor as the codec writes it, or an error naming what it cannot write."""
    if tensor.dtype not in codec.NAMES:
        raise CodecError(f"{path}: a tensor of dtype {tensor.dtype} cannot be stored")
    if tensor.layout != torch.strided or tensor.is_meta:
        raise CodecError(
            f"{path}: a {tensor.layout} tensor on {tensor.device} has no data to store"
        )
    return tensor.detach().cpu().contiguous()
