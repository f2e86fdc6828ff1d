"""The one serialization between server and clients: safetensors for tensors, JSON for the rest.

Nothing here unpickles or evaluates: safetensors holds raw tensor bytes with a JSON
header, and the extra metadata travels as one JSON string inside that header.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from flcore.errors import CodecError

META_KEY = "flcore"


def encode(weights: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> bytes:
    """Serialize a state dict and a JSON-able mapping into one payload."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in weights.items():
        tensor = _plain(tensor)
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages and tensor.numel():
            tensor = tensor.clone()  # tied weights: safetensors refuses shared storage
        storages.add(storage)
        tensors[name] = tensor
    header = {META_KEY: json.dumps(meta or {}, separators=(",", ":"))}
    return _st_save(tensors, metadata=header)


def decode(payload: bytes, what: str = "payload") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a payload written by :func:`encode`; ``what`` names it in errors."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise CodecError(f"{what}: expected bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) < 8:
        raise CodecError(f"{what}: truncated ({len(payload)} bytes, no safetensors header)")
    header_len = int.from_bytes(payload[:8], "little")
    if header_len > len(payload) - 8:
        raise CodecError(
            f"{what}: truncated (header says {header_len} bytes, {len(payload) - 8} follow)"
        )
    try:
        header = json.loads(payload[8 : 8 + header_len])
    except ValueError as err:
        raise CodecError(f"{what}: malformed header: {err}") from err
    if not isinstance(header, dict):
        raise CodecError(f"{what}: malformed header: not a JSON object")
    try:
        tensors = _st_load(payload)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CodecError(f"{what}: malformed or truncated tensors: {err}") from err
    meta_text = (header.get("__metadata__") or {}).get(META_KEY, "{}")
    try:
        meta = json.loads(meta_text)
    except ValueError as err:
        raise CodecError(f"{what}: malformed metadata: {err}") from err
    if not isinstance(meta, dict):
        raise CodecError(f"{what}: malformed metadata: not a JSON object")
    return tensors, meta


def save_file(
    path: str | Path, weights: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None
) -> None:
    """Write a payload to ``path`` atomically: a crash leaves the old file or the new one."""
    write_atomic(Path(path), encode(weights, meta))


def load_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_file` (or any safetensors file)."""
    path = Path(path)
    try:
        payload = path.read_bytes()
    except OSError as err:
        raise CodecError(f"cannot read {str(path)!r}: {err.strerror}") from err
    return decode(payload, what=str(path))


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    # safetensors refuses views that share storage or are not contiguous.
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    return tensor if tensor.is_contiguous() else tensor.contiguous()
