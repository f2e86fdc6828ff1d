"""The one serialization between server and clients: safetensors for tensors, JSON for the rest.

Nothing here unpickles or evaluates: safetensors holds raw tensor bytes with a JSON
header, and the extra metadata travels as one JSON string inside that header. Decoding is
total: any bytes give the weights or a :class:`CodecError` with the reason, at a cost
bounded per byte (nesting, sizes and offsets are checked before anything relies on them).
"""

from __future__ import annotations

import functools
import json
import math
import operator
import os
import re
import tempfile
from collections.abc import Mapping
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any, cast

import attrs
import numpy as np
import torch

from flcore.errors import CodecError

#: What crosses between server and clients: a codec payload, in bytes or a writable buffer.
Payload = bytes | bytearray | memoryview

META_KEY = "flcore"
#: Largest header accepted: a header is names and shapes, never megabytes.
MAX_HEADER = 100 * 1024 * 1024
#: Deepest JSON nesting of a header or of the metadata in it. A header nests three deep and
#: honest metadata a few more; what is deeper only overflows a parser's (or a check's) stack.
MAX_DEPTH = 64
#: Bound (exclusive) on a shape entry and on the product of a shape's non-zero entries:
#: torch keeps sizes and strides as signed 64-bit integers.
MAX_DIM = 2**62

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
#: One encoder for every payload: ``json.dumps`` with options builds a new one per call.
_JSON = json.JSONEncoder(separators=(",", ":"))
#: A backslash escape in a JSON string, paired from the left as a parser pairs them.
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
#: Bytes looked at per vectorized step of the depth scan: its temporaries stay small.
_SCAN = 1 << 20


def nesting_within(text: bytes | str, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON ``text`` (UTF-8) nests no deeper than ``limit``.

    Checked before ``json.loads``, which recurses once per level and so overflows its
    stack on deep input. Brackets inside strings do not count. Text that is not JSON may
    pass; the parser then refuses it without going deeper than the scan saw. Text with
    few brackets costs two counts; any other a dozen vectorized passes per byte.
    """
    if isinstance(text, str):
        if text.count("[") + text.count("{") <= limit:
            return True
        text = text.encode("utf-8", "surrogatepass")
    elif text.count(b"[") + text.count(b"{") <= limit:
        return True
    if b"\\" in text:
        text = _ESCAPE.sub(b"", text)  # an escaped quote neither opens nor closes a string
    codes = np.frombuffer(text, dtype=np.uint8)
    depth, inside = 0, 0
    for start in range(0, len(codes), _SCAN):
        part = codes[start : start + _SCAN]
        parity = np.bitwise_xor.accumulate((part == ord('"')).view(np.uint8))  # 1: in a string
        parity ^= inside
        folded = part | 0x20  # "[" and "{" become 0x7B, "]" and "}" 0x7D, nothing else does
        steps = (folded == 0x7B).view(np.int8) - (folded == 0x7D).view(np.int8)
        steps &= (parity - 1).view(np.int8)  # all ones outside a string, zero inside
        levels = np.cumsum(steps, dtype=np.int32)
        if depth + int(levels.max()) > limit:
            return False
        depth, inside = depth + int(levels[-1]), int(parity[-1])
    return True


def _parse(text: str, what: str) -> Any:
    """``json.loads(text)``, or a :class:`CodecError` that begins with ``what``."""
    if not nesting_within(text):
        raise CodecError(f"{what}: nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text)
    except ValueError as err:
        raise CodecError(f"{what}: {err}") from err


def _layout(
    weights: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None
) -> tuple[bytes, list[tuple[int, torch.Tensor]]]:
    """The header (length prefix included) and ``(offset, tensor)`` of the data, in order."""
    tensors = {name: _plain(t) for name, t in weights.items()}
    order, entries, offsets = _entries(tuple((n, t.dtype, t.shape) for n, t in tensors.items()))
    layout = [(offset, tensors[name]) for name, offset in zip(order, offsets, strict=True)]
    return _head(entries, meta), layout


def _head(entries: str, meta: Mapping[str, Any] | None) -> bytes:
    """The header of a payload with these tensor entries, its length prefix included."""
    text = _JSON.encode(meta or {})
    if not nesting_within(text):  # what this codec writes, it reads back
        raise CodecError(f"metadata nested deeper than {MAX_DEPTH} levels")
    metadata = encode_basestring_ascii(text)  # a JSON string in JSON
    head = f'{{"__metadata__":{{"{META_KEY}":{metadata}}}{entries}}}'.encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    return len(head).to_bytes(8, "little") + head


@functools.lru_cache(maxsize=64)
def _entries(
    signature: tuple[tuple[str, torch.dtype, torch.Size], ...],
) -> tuple[list[str], str, list[int]]:
    """For tensors of these names, dtypes and shapes: their order in the data, their header
    entries as JSON text, and their offsets. Cached: a run sends the same model shape every
    round, and building the header was a good part of a small model's serialization."""
    # Largest items first, then by name (as safetensors does): every tensor stays aligned.
    items = sorted(signature, key=lambda item: (-item[1].itemsize, item[0]))
    order, parts, offsets, offset = [], [], [], 0
    for name, dtype, shape in items:
        if dtype not in NAMES:
            raise CodecError(f"tensor {name!r}: dtype {dtype} cannot be serialized")
        size = math.prod(shape) * dtype.itemsize
        entry = {
            "dtype": NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        parts.append(f",{json.dumps(name)}:{json.dumps(entry, separators=(',', ':'))}")
        order.append(name)
        offsets.append(offset)
        offset += size
    text = "".join(parts)
    _remember(text, [(name, dtype, tuple(shape)) for name, dtype, shape in items], offsets, offset)
    return order, text, offsets


@attrs.frozen(eq=False)
class Run:
    """One dtype's stretch of a payload's data: where it starts (byte), how many elements it
    holds, and ``(name, shape, stride, first element)`` of each tensor in it, in order."""

    dtype: torch.dtype
    begin: int
    count: int
    views: tuple[tuple[str, tuple[int, ...], tuple[int, ...], int], ...]


@attrs.frozen(eq=False)
class Layout:
    """Where the tensors of a header this process wrote lie in the data: ``key`` is the
    header's entries as text, ``size`` the data's length in bytes."""

    key: str
    size: int
    runs: tuple[Run, ...]
    #: Every tensor's name, in the order of the runs.
    names: tuple[str, ...] = attrs.field(init=False)

    @names.default
    def _names(self) -> tuple[str, ...]:
        return tuple(name for run in self.runs for name, *_ in run.views)


@attrs.frozen(eq=False)
class Flat:
    """A decoded payload's data as flat views, one per :class:`Run` of ``layout``, and the
    tensors the decoder made as views of them, in the layout's order: a check or a sum over
    every weight takes one call per dtype instead of one per tensor. It speaks for a state
    dict only while that dict holds exactly these tensors (:meth:`covers`); their values may
    change in place, which the runs see, since they share the memory."""

    layout: Layout
    runs: tuple[torch.Tensor, ...]
    tensors: tuple[torch.Tensor, ...]
    #: The whole data section, when the Flat owns it (:func:`flat_buffer`): a payload of
    #: these tensors is then its header and this, in one copy.
    data: bytearray | None = attrs.field(default=None, kw_only=True)

    def covers(self, weights: Mapping[str, torch.Tensor]) -> bool:
        if len(weights) != len(self.tensors):
            return False
        # map, not a generator: this runs several times per client and round
        return all(map(operator.is_, map(weights.get, self.layout.names), self.tensors))


#: The layout of each header this process wrote, by the text of its entries: a payload whose
#: header is ours byte for byte but for the metadata (a client's reply has the global model's
#: entries) is neither parsed nor checked again.
_KNOWN: dict[str, Layout] = {}
_PREFIX = f'{{"__metadata__":{{"{META_KEY}":"'


def _remember(
    text: str, items: list[tuple[str, torch.dtype, tuple[int, ...]]], offsets: list[int], size: int
) -> None:
    groups: list[tuple[torch.dtype, int, list[Any]]] = []  # (dtype, first byte, views)
    for (name, dtype, shape), offset in zip(items, offsets, strict=True):
        if not groups or groups[-1][0] != dtype:
            groups.append((dtype, offset, []))
        _, begin, views = groups[-1]
        stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        views.append((name, shape, stride, (offset - begin) // dtype.itemsize))
    runs = [
        Run(dtype, begin, sum(math.prod(shape) for _, shape, *_ in views), tuple(views))
        for dtype, begin, views in groups
    ]
    if len(_KNOWN) >= 64:  # the oldest goes (its payloads then take the full path)
        _KNOWN.pop(next(iter(_KNOWN), ""), None)
    _KNOWN[text] = Layout(text, size, tuple(runs))


def _known(header: bytes) -> tuple[str, Layout] | None:
    """``(metadata JSON, layout)`` when ``header`` is one this process wrote, else ``None``."""
    try:
        text = header.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text.startswith(_PREFIX):
        return None
    try:
        meta, end = json.decoder.scanstring(text, len(_PREFIX))  # type: ignore[attr-defined]
    except ValueError:
        return None
    rest = text[end:].rstrip(" ")
    if not (rest.startswith("}") and rest.endswith("}")):
        return None
    known = _KNOWN.get(rest[1:-1])
    return None if known is None else (meta, known)


def _buffer(tensor: torch.Tensor) -> Any:
    """The tensor's memory as a buffer, without a copy: a numpy view (numpy has no bfloat16,
    whose bytes travel as int16). Cheaper per tensor than any torch view."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy()


def encode(
    weights: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any] | None = None,
    flat: Flat | None = None,
) -> bytearray:
    """Serialize a state dict and a JSON-able mapping into one safetensors payload.

    The payload is a ``bytearray`` written in one pass (no intermediate copies), so that the
    receiver can decode it without copying (:func:`decode` with ``copy=False``). When
    ``weights`` are exactly the tensors of ``flat``, a :func:`flat_buffer`, its data section
    is copied whole instead of tensor by tensor.
    """
    if flat is not None and flat.data is not None and flat.covers(weights):
        return bytearray().join([_head(flat.layout.key, meta), flat.data])
    head, layout = _layout(weights, meta)
    # one join: sized once, each tensor's memory copied straight in, nothing zeroed first
    return bytearray().join([head, *(_buffer(t) for _, t in layout)])


def layout_of(weights: Mapping[str, torch.Tensor]) -> Layout | None:
    """The layout :func:`encode` gives ``weights`` when it is remembered (it is after
    encoding them): a payload decoded in the same layout has their names, shapes and dtypes."""
    signature = tuple((n, t.dtype, t.shape) for n, t in weights.items())
    try:
        _, entries, _ = _entries(signature)
    except CodecError:
        return None
    return _KNOWN.get(entries)


def flat_buffer(weights: Mapping[str, torch.Tensor]) -> Flat:
    """Fresh tensors of the names, dtypes and shapes of ``weights`` (values unset), laid out
    in one buffer as a payload's data section is: what :func:`encode` sends of them in one
    copy, and what a payload of the same layout (:attr:`Flat.layout`) fills in one copy per
    dtype."""
    layout = layout_of(weights)
    if layout is None:  # still in _entries' cache but no longer remembered, or unsupported
        _entries.cache_clear()
        layout = layout_of(weights)
    if layout is None:
        raise CodecError("these tensors cannot be serialized (a dtype the codec lacks)")
    data = bytearray(layout.size)
    views = _views(data, 0, False, layout)
    return Flat(views.layout, views.runs, views.tensors, data=data)


def decode(
    payload: bytes | bytearray | memoryview, what: str = "payload", copy: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a payload written by :func:`encode` (or any safetensors file); ``what`` names it in
    errors. With ``copy=False`` and a writable payload, tensors are views into it (no copy):
    the caller then owns the payload and must not reuse it."""
    tensors, meta, _ = decode_flat(payload, what, copy)
    return tensors, meta


def decode_flat(
    payload: bytes | bytearray | memoryview, what: str = "payload", copy: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any], Flat | None]:
    """:func:`decode`, and the data as a :class:`Flat` when the header is one this process
    wrote (a client's reply to the server's global model is)."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise CodecError(f"{what}: expected bytes, got {type(payload).__name__}")
    if isinstance(payload, memoryview) and not (
        payload.ndim == 1 and payload.itemsize == 1 and payload.c_contiguous
    ):
        raise CodecError(f"{what}: expected contiguous bytes, got a memoryview of {payload.format}")
    size = len(payload)
    if size < 8:
        raise CodecError(f"{what}: truncated ({size} bytes, no safetensors header)")
    header_len = int.from_bytes(payload[:8], "little")
    if header_len > size - 8:
        raise CodecError(f"{what}: truncated (header says {header_len} bytes, {size - 8} follow)")
    if header_len > MAX_HEADER:
        raise CodecError(f"{what}: header of {header_len} bytes is over the limit")
    start = 8 + header_len
    header = bytes(payload[8:start])
    known = _known(header)
    if known is not None and known[1].size == size - start and start % 8 == 0:
        meta = _flcore_metadata(known[0], what)
        views = _views(payload, start, copy, known[1])
        return dict(zip(views.layout.names, views.tensors, strict=True)), meta, views
    parsed = _header(header, what)
    meta = _metadata(parsed.pop("__metadata__", None), what)
    data_len = size - start
    spans = []
    for name, entry in parsed.items():
        spans.append((*_span(name, entry, data_len, what), name))
    spans.sort(key=operator.itemgetter(0, 1, 4))  # by offsets, then name: dtypes do not order
    position = 0
    for begin, end, _, _, name in spans:
        if begin != position:
            raise CodecError(
                f"{what}: malformed or truncated tensors: {name!r} does not follow "
                "the previous tensor"
            )
        position = end
    if position != data_len:
        raise CodecError(
            f"{what}: malformed or truncated tensors: {data_len} data bytes, {position} described"
        )
    source, base = _source(payload, start, copy)
    tensors = {}
    for begin, end, dtype, shape, name in spans:
        count = (end - begin) // dtype.itemsize
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        if (base + begin) % dtype.itemsize:  # unaligned (another writer's): a copy of its own
            raw = bytearray(payload[start + begin : start + end])
            flat = torch.frombuffer(raw, dtype=dtype, count=count)
        else:
            flat = torch.frombuffer(source, dtype=dtype, count=count, offset=base + begin)
        tensors[name] = flat.view(shape)
    return tensors, meta, None


def _source(
    payload: bytes | bytearray | memoryview, start: int, copy: bool
) -> tuple[bytearray | memoryview, int]:
    """The buffer tensors view, and where the data starts in it: the payload itself when
    it is writable and ``copy`` is false, else one copy of the data."""
    writable = isinstance(payload, bytearray) or (
        isinstance(payload, memoryview) and not payload.readonly
    )
    if writable and not copy:
        return payload, start  # type: ignore[return-value]
    return bytearray(payload[start:]), 0


def _views(payload: bytes | bytearray | memoryview, start: int, copy: bool, layout: Layout) -> Flat:
    """The tensors of a known header: one buffer view per dtype's stretch, one strided view
    of it per tensor (our header pads the data to 8 bytes: every stretch is aligned)."""
    source, base = _source(payload, start, copy)
    runs, tensors = [], []
    for run in layout.runs:
        if run.count:
            flat = torch.frombuffer(
                source, dtype=run.dtype, count=run.count, offset=base + run.begin
            )
        else:
            flat = torch.empty(0, dtype=run.dtype)
        runs.append(flat)
        tensors += [flat.as_strided(shape, stride, first) for _, shape, stride, first in run.views]
    return Flat(layout, tuple(runs), tuple(tensors))


def _header(header: bytes, what: str) -> dict[str, Any]:
    """The JSON object of a header this process did not write: UTF-8, as safetensors requires."""
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CodecError(f"{what}: malformed header: not UTF-8 at byte {err.start}") from None
    parsed = _parse(text, f"{what}: malformed header")
    if not isinstance(parsed, dict):
        raise CodecError(f"{what}: malformed header: not a JSON object")
    return parsed


def _span(
    name: str, entry: Any, data_len: int, what: str
) -> tuple[int, int, torch.dtype, list[int]]:
    """``(begin, end, dtype, shape)`` of one header entry, each checked: a peer wrote it."""
    if not isinstance(entry, dict):
        raise CodecError(f"{what}: malformed header: entry {name!r:.80} is not an object")
    kind, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    dtype = DTYPES.get(kind) if isinstance(kind, str) else None
    if dtype is None:
        raise CodecError(
            f"{what}: tensor {name!r:.80} has unknown dtype {kind!r:.40} "
            f"(known: {', '.join(DTYPES)})"
        )
    count = _element_count(shape)
    if count is None:
        raise CodecError(
            f"{what}: tensor {name!r:.80} has a malformed shape {shape!r:.80} (non-negative "
            f"integers below 2**62, their non-zero product too)"
        )
    # type(...) is int: JSON's true and false are no offsets (isinstance would let them in)
    if not (type(offsets) is list and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise CodecError(f"{what}: tensor {name!r:.80} has malformed data offsets {offsets!r:.80}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise CodecError(
            f"{what}: malformed or truncated tensors: {name!r:.80} lies outside the "
            f"{data_len} data bytes"
        )
    if end - begin != count * dtype.itemsize:
        raise CodecError(f"{what}: tensor {name!r:.80}: {end - begin} bytes for shape {shape}")
    return begin, end, dtype, cast(list[int], shape)


def _element_count(shape: Any) -> int | None:
    """The number of elements of a header's shape; ``None`` unless it is a list of
    non-negative ints (not JSON's booleans) whose non-zero entries multiply to below
    :data:`MAX_DIM`. Beyond that torch's sizes and strides overflow, even for an empty tensor."""
    if type(shape) is not list:
        return None
    product, empty = 1, False
    for size in shape:
        if type(size) is not int or not 0 <= size < MAX_DIM:
            return None
        if size == 0:
            empty = True
            continue
        product *= size
        if product >= MAX_DIM:  # stops at once: the product never grows past 124 bits
            return None
    return 0 if empty else product


def _metadata(raw: Any, what: str) -> dict[str, Any]:
    """The flcore metadata of a header's ``__metadata__``: as safetensors requires, a map of
    strings to strings; its ``flcore`` entry is the JSON text of an object."""
    if raw is None:
        return {}
    if not (isinstance(raw, dict) and all(type(value) is str for value in raw.values())):
        raise CodecError(f"{what}: malformed metadata: not a JSON object of strings")
    return _flcore_metadata(raw.get(META_KEY, "{}"), what)


def _flcore_metadata(text: str, what: str) -> dict[str, Any]:
    """The object the JSON ``text`` of the metadata's ``flcore`` entry holds."""
    meta = _parse(text, f"{what}: malformed metadata")
    if not isinstance(meta, dict):
        raise CodecError(f"{what}: malformed metadata: not a JSON object")
    return meta


def save_file(
    path: str | Path, weights: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None
) -> None:
    """Write a payload to ``path`` atomically: a crash leaves the old file or the new one.
    Tensors are written straight from their memory, never gathered into one buffer first."""
    head, layout = _layout(weights, meta)

    def write(fh: Any) -> None:
        fh.write(head)
        for _, t in layout:
            if t.numel():
                fh.write(_buffer(t).data)

    _write_atomic(Path(path), write)


def load_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_file` (or any safetensors file)."""
    path = Path(path)
    try:
        payload = path.read_bytes()
    except OSError as err:
        raise CodecError(f"cannot read {str(path)!r}: {err.strerror}") from err
    return decode(payload, what=str(path))


def write_atomic(path: Path, data: bytes | bytearray) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    _write_atomic(path, lambda fh: fh.write(data))


def _write_atomic(path: Path, write: Any) -> None:
    """Write through a temporary ``.NAME.XXXXXXXX.tmp`` beside ``path`` (a crash can leave
    one behind; a resumed run removes it). An OSError names ``path`` itself: a failed
    ``write`` or ``fsync`` names no file, and the temporary file's name means nothing to
    the user."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as contiguous CPU memory without autograd (itself when it already is)."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    if not tensor.is_cpu:
        tensor = tensor.cpu()
    return tensor if tensor.is_contiguous() else tensor.contiguous()
