"""Fuzz of the deployment's wire format: a mutated message only ever parses or raises
``WireError``, and a streamed reply that parses goes on to the server's contribution checks.

Seeded and bounded like the codec's fuzz (``tests/test_fuzz_codec.py``, whose mutations
of bytes this reuses), without a network: ``wire.unpack`` parses each unary message and
``wire.receive`` reads a stream from any iterable of messages. The counts are printed
(``pytest -s``) and recorded as the test's ``fuzz`` property.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from flcore import codec
from flcore.deploy import wire
from tests.test_fuzz_codec import (
    META,
    REFERENCE,
    deep,
    extend,
    flip_bits,
    overwrite,
    truncate,
    weights,
)

SEED = 23
INPUTS = 3000
MAX_SIZE = 1 << 16  # the receiver's limit ([job] max_message_mb, in bytes)

#: The unary messages of the protocol: join, heartbeat, work request, join answer, job request.
UNARY = [
    {"name": "client-0", "job": "ab" * 32, "own_task": True},
    {"session": "5f0c6d1e-8d2b-4f7a-9a51-1f3c2b7d9e10"},
    {"session": "5f0c6d1e-8d2b-4f7a-9a51-1f3c2b7d9e10", "heartbeat": 5.0},
    {"name": "client-0"},
]

#: What a hostile peer puts in a header field.
HOSTILE: list[Any] = [
    -1,
    2**70,
    10**400,
    1e3,
    float("inf"),
    "5",
    True,
    None,
    [],
    {"a": 1},
    "x" * 10_000,
]


def rewrite(rng: random.Random, header: dict[str, Any]) -> bytes:
    """A header with one field (``size`` most often) hostile, or hostile JSON around it."""
    choice = rng.randrange(5)
    if choice == 0:
        field = rng.choice(["size", "size", *header])
        return json.dumps({**header, field: rng.choice(HOSTILE)}).encode()
    if choice == 1:
        return (
            json.dumps({**header, "x": "{}"})[:-1].encode()
            + b',"deep":'
            + deep(rng).encode()
            + b"}"
        )
    if choice == 2:
        return json.dumps(
            {**header, "size": header.get("size", 0) + rng.choice([-1, 1, 7])}
        ).encode()
    if choice == 3:
        return rng.choice(
            [
                deep(rng).encode(),
                b"\xff" + json.dumps(header).encode(),
                b'{"size":' + b"9" * 5000 + b"}",
                b"[" + json.dumps(header).encode() + b"]",
                b'{"size":4' + b" " * wire.MAX_HEADER + b"}",
                b'"' + b'\\"' * 20_000,
            ]
        )
    return json.dumps(header).encode().replace(b"}", b"", rng.randrange(2))


def bytes_mutation(rng: random.Random, message: bytes) -> bytes:
    mutate = rng.choice([flip_bits, overwrite, truncate, extend])
    return mutate(rng, message) if message else message


def mutate_unary(rng: random.Random) -> bytes:
    header = rng.choice(UNARY)
    if rng.random() < 0.5:
        return rewrite(rng, header)
    return bytes_mutation(rng, wire.pack(header))


def mutate_stream(rng: random.Random, payload: bytes) -> list[bytes]:
    """A reply's stream with its header, its chunks or both damaged."""
    chunk = rng.choice([7, 64, len(payload) or 1])
    header = {"session": "s", "task": "t1", "size": len(payload)}
    chunks = [payload[i : i + chunk] for i in range(0, len(payload), chunk)]
    first = wire.pack(header)
    kind = rng.randrange(4)
    if kind == 0:
        first = rewrite(rng, header)
    elif kind == 1:
        first = bytes_mutation(rng, first)
    elif kind == 2 and chunks:
        i = rng.randrange(len(chunks))
        action = rng.randrange(4)
        if action == 0:
            del chunks[i]
        elif action == 1:
            chunks.insert(i, chunks[i])
        elif action == 2:
            chunks[i] = bytes_mutation(rng, chunks[i])
        else:
            chunks.append(b"x" * rng.randint(1, 9))
    else:  # the data intact but the stream cut short, or no header at all
        return rng.choice([[], [first], [first, *chunks[: max(len(chunks) - 1, 0)]]])
    return [first, *chunks]


def receive_one(messages: list[bytes], counts: dict[str, int]) -> None:
    """Read a stream as the server reads a reply; what arrives goes on to the codec and
    the contribution checks, which may refuse it only with their own errors."""
    from flcore.contribution import Contribution, validate
    from flcore.errors import CodecError, ContributionRefused

    seen: list[dict[str, Any]] = []
    try:
        header, payload = wire.receive(messages, MAX_SIZE, "reply", on_header=seen.append)
    except wire.WireError:
        counts["refused"] += 1
        return
    assert seen == [header] and len(payload) == header["size"] <= MAX_SIZE
    counts["parsed"] += 1
    try:
        contribution = Contribution.decode(payload, sender="client-0")
        validate(contribution, reference=REFERENCE, round=2, clients={"client-0"}, received=set())
    except (CodecError, ContributionRefused):
        counts["payloads refused"] += 1
    else:
        counts["payloads accepted"] += 1


def unpack_one(message: bytes, counts: dict[str, int]) -> None:
    try:
        parsed = wire.unpack(message, "message")
    except wire.WireError:
        counts["refused"] += 1
        return
    assert isinstance(parsed, dict)
    counts["parsed"] += 1


def test_mutated_wire_messages_only_ever_parse_or_raise_wire_errors(
    record_property: Callable[[str, object], None],
) -> None:
    payload = bytes(codec.encode(weights(), META))
    rng = random.Random(SEED)
    counts = dict.fromkeys(
        ["tried", "refused", "parsed", "payloads refused", "payloads accepted"], 0
    )
    crashes: list[str] = []
    slowest = 0.0
    for i in range(INPUTS):
        unary = i % 3 == 0
        started = time.perf_counter()
        counts["tried"] += 1
        try:
            if unary:
                unpack_one(mutate_unary(rng), counts)
            else:
                receive_one(mutate_stream(rng, payload), counts)
        except Exception as err:  # anything but the protocol's own refusal is a crash
            crashes.append(f"{'unary' if unary else 'stream'}: {type(err).__name__}: {err!s:.200}")
        slowest = max(slowest, time.perf_counter() - started)
    counts["crashed"] = len(crashes)
    summary = {**counts, "slowest_s": round(slowest, 4), "seed": SEED}
    print(f"\nwire fuzz: {summary}")
    record_property("fuzz", json.dumps(summary))
    assert not crashes, crashes[:5]
    assert counts["refused"] > counts["tried"] // 3
    assert counts["payloads accepted"] > 0


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 64 levels"),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested deeper than 64 levels"),
        (b'{"size":' + b"9" * 5000 + b"}", "not JSON (Exceeds the limit (4300 digits)"),
        (b'{"name":"\xff"}', "not JSON (not UTF-8 at byte 9)"),
    ],
)
def test_the_hostile_headers_are_refused_with_their_reason(message: bytes, reason: str) -> None:
    """Each crashed the server before: a RecursionError, or a ValueError json.loads raises
    for an integer of more than 4300 digits (no JSONDecodeError)."""
    message = message[: wire.MAX_HEADER]
    with pytest.raises(wire.WireError) as info:
        wire.unpack(message, "join request")
    assert f"malformed join request: {reason}" in str(info.value)
    with pytest.raises(wire.WireError, match="malformed reply header"):
        wire.receive([message], MAX_SIZE, "reply")


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = json.dumps({"name": "[" * 1000 + '\\"{' * 1000, "size": 0}).encode()
    assert wire.unpack(text, "join request")["size"] == 0
