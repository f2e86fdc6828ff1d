"""The wire format: raw bytes over gRPC's generic handlers, no protobuf and no pickle.

A streamed message is one JSON header (its ``size`` says how many payload bytes follow),
then the payload in chunks of at most :data:`CHUNK` bytes, so a model of any size crosses
without raising gRPC's message limit. Everything else is one JSON object per message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from flcore.codec import MAX_DEPTH, nesting_within
from flcore.errors import FLCoreError

SERVICE = "flcore.Federation"
JOIN = f"/{SERVICE}/Join"
NEXT = f"/{SERVICE}/Next"
REPLY = f"/{SERVICE}/Reply"
BEAT = f"/{SERVICE}/Beat"
JOB = f"/{SERVICE}/Job"

CHUNK = 1024 * 1024
#: Largest single gRPC message either side accepts: a chunk, with room for a header.
MAX_GRPC_MESSAGE = CHUNK + 64 * 1024
#: Largest JSON header: names and numbers, never a model.
MAX_HEADER = 64 * 1024


class WireError(FLCoreError):
    """A message broke the protocol; the text is the reason it was refused."""


def grpc_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE),
        ("grpc.so_reuseport", 0),  # a second server on the same port is an error, not a twin
    ]


def pack(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def unpack(data: bytes, what: str) -> dict[str, Any]:
    """A JSON object, or a :class:`WireError` that says what was wrong with it: a peer wrote
    it, so it must be UTF-8 (``pack`` writes ASCII) and nest no deeper than
    :data:`flcore.codec.MAX_DEPTH`, which ``json.loads`` would recurse into until it fails."""
    if not isinstance(data, bytes) or len(data) > MAX_HEADER:
        raise WireError(f"malformed {what}: not a JSON header of at most {MAX_HEADER} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise WireError(f"malformed {what}: not JSON (not UTF-8 at byte {err.start})") from None
    if not nesting_within(data):
        raise WireError(f"malformed {what}: nested deeper than {MAX_DEPTH} levels")
    try:
        obj = json.loads(text)
    except ValueError as err:  # a JSONDecodeError, or an integer of over 4300 digits
        raise WireError(f"malformed {what}: not JSON ({err})") from None
    if not isinstance(obj, dict):
        raise WireError(f"malformed {what}: not a JSON object")
    return obj


def stream(
    header: Mapping[str, Any], payload: bytes | bytearray | memoryview | None = None
) -> Iterator[bytes]:
    """The messages of one streamed message: the header, then the payload's chunks."""
    view = memoryview(payload if payload is not None else b"")
    yield pack({**header, "size": len(view)})
    for start in range(0, len(view), CHUNK):
        yield bytes(view[start : start + CHUNK])


def receive(
    messages: Iterable[bytes], max_size: int, what: str, on_header: Any = None
) -> tuple[dict[str, Any], bytearray]:
    """Read one streamed message: its header and payload, into one buffer that grows as
    chunks arrive (never past the declared size). Refuses (``WireError``) a malformed
    header, a size above ``max_size``, more bytes than declared and a stream that ends
    early. ``on_header(header)`` may refuse the message before its payload is read."""
    it = iter(messages)
    try:
        first = next(it)
    except StopIteration:
        raise WireError(f"truncated {what}: the stream ended before its header") from None
    header = unpack(first, f"{what} header")
    size = header.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise WireError(f"malformed {what} header: 'size' must be a non-negative integer")
    if size > max_size:
        raise WireError(
            f"oversized {what}: declares {size} bytes, the limit is {max_size} "
            "([job] max_message_mb)"
        )
    if on_header is not None:
        on_header(header)
    buffer = bytearray()  # grows with what arrives: a declared size costs nothing
    for chunk in it:
        if len(buffer) + len(chunk) > size:
            raise WireError(f"oversized {what}: more than the {size} bytes its header declares")
        buffer += chunk
    if len(buffer) < size:
        raise WireError(f"truncated {what}: {len(buffer)} of the {size} bytes its header declares")
    return header, buffer
