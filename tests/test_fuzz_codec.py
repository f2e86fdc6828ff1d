"""Fuzz of the codec: a mutated real payload only ever decodes or raises ``CodecError``.

Seeded and bounded: the same few thousand inputs every run, in a second or two. Each
input is decoded on both parse paths (the remembered header this process wrote, and the
full parse of a header it did not), and what decodes goes on through ``Contribution.decode``
and ``validate``, which may refuse it only with their own errors. The counts are printed
(``pytest -s``) and recorded as the test's ``fuzz`` property (``--junitxml``).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from flcore import codec
from flcore.contribution import Contribution, validate
from flcore.errors import CodecError, ContributionRefused

SEED = 17
INPUTS = 2500

META = {
    "kind": "contribution",
    "client_id": "client-0",
    "round": 2,
    "num_samples": 40,
    "local_iterations": 3,
    "metrics": {"train_loss": 0.5, "initial_validation": {"loss": 0.4, "accuracy": 0.8}},
}


def weights() -> dict[str, torch.Tensor]:
    """A small model with every kind of tensor the codec lays out: several dtypes, a
    scalar, an empty tensor."""
    torch.manual_seed(0)
    return {
        **torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).state_dict(),
        "flag": torch.tensor([True, False]),
        "half": torch.arange(3, dtype=torch.bfloat16),
        "wide": torch.arange(4, dtype=torch.float64).reshape(2, 2),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(7, dtype=torch.int32),
    }


REFERENCE = weights()


def split(payload: bytes) -> tuple[bytes, bytes]:
    size = int.from_bytes(payload[:8], "little")
    return payload[8 : 8 + size], payload[8 + size :]


def join(header: bytes, data: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header + data


def deep(rng: random.Random) -> str:
    """JSON text nested 65 to 20,000 levels deep, of arrays, objects or both."""
    depth = rng.choice([65, 100, 1000, 20_000])
    kind = rng.choice(["array", "object", "mixed"])
    if kind == "array":
        return "[" * depth + "]" * depth
    if kind == "object":
        return '{"a":' * depth + "1" + "}" * depth
    return '[{"a":' * (depth // 2) + "1" + "}]" * (depth // 2)


#: What a hostile header puts where a field belongs (the issue's cases and their kin).
HOSTILE: dict[str, list[Any]] = {
    "dtype": [{"F32": 1}, ["F32"], 3, 2.5, None, True, "f32", "", "C64", "F32" * 1000],
    "shape": [
        [0, 2**70],
        [2**70],
        [-1],
        [2**61, 2**61, 0],
        [0, 2**40, 2**40],
        [1.0],
        [True],
        "3",
        {},
        [[1]],
        10**400,
        [10**400],
        [1] * 1000,
        [0] * 70,
    ],
    "data_offsets": [
        [-8, 0],
        [0, -1],
        [8, 0],
        [0, 2**70],
        [-(2**70), 4],
        [0],
        [0, 1, 2],
        "0",
        [0.0, 4.0],
        [True, False],
        None,
        [10**400, 10**400 + 4],
    ],
    "entry": [3, [], None, "x", {"dtype": "F32"}],
}


def rewrite_field(rng: random.Random, header: dict[str, Any]) -> dict[str, Any]:
    """One tensor entry's field (or the whole entry) replaced by a hostile value."""
    names = [n for n in header if n != "__metadata__"]
    name = rng.choice(names)
    field = rng.choice(list(HOSTILE))
    value = rng.choice(HOSTILE[field])
    if field == "entry":
        header[name] = value
    else:
        header[name] = {**header[name], field: value}
    return header


def overlap(rng: random.Random, header: dict[str, Any]) -> dict[str, Any]:
    """Two tensors' spans made to overlap, touch out of order, or leave a gap."""
    names = [n for n in header if n != "__metadata__"]
    a, b = rng.sample(names, 2)
    begin, end = header[a]["data_offsets"]
    shift = rng.choice([-4, -1, 0, 1, 4])
    header[b] = {**header[b], "data_offsets": [begin + shift, end + shift]}
    return header


def rewrite_metadata(rng: random.Random, header: dict[str, Any]) -> dict[str, Any]:
    """The metadata made hostile: not strings, not an object, or nested JSON in its string."""
    choice = rng.randrange(6)
    if choice == 0:
        header["__metadata__"] = rng.choice([[1], "x", 3, None, {"flcore": 3}, {"a": {"b": 1}}])
    elif choice == 1:
        header["__metadata__"] = {"flcore": deep(rng)}
    elif choice == 2:
        inner = json.dumps(META)[:-1] + ',"metrics":' + deep(rng) + "}"
        header["__metadata__"] = {"flcore": inner}
    elif choice == 3:
        header["__metadata__"] = {"flcore": json.dumps({**META, "num_samples": 10**400})}
    elif choice == 4:
        header["__metadata__"] = {"flcore": rng.choice(["[1]", "{", '"x"', "1e999", "{}" * 3])}
    else:
        header["__metadata__"] = {"flcore": json.dumps(META), "other": rng.choice([1, [], None])}
    return header


def header_rewrite(rng: random.Random, payload: bytes) -> bytes:
    """Parse the header, make one hostile change, write it back (the length mostly fixed)."""
    text, data = split(payload)
    change = rng.choice([rewrite_field, rewrite_field, overlap, rewrite_metadata])
    header = change(rng, json.loads(text))
    new = json.dumps(header, separators=(",", ":")).encode()
    if rng.random() < 0.3:
        new += b" " * rng.randrange(8)
    out = join(new, data)
    return out if rng.random() < 0.9 else length_prefix(rng, out)


def known_metadata(rng: random.Random, payload: bytes) -> bytes:
    """The header with only the metadata string replaced and the data kept aligned: for
    our own payload, the remembered-header path (``_known``) reads it and must check it."""
    text, data = split(payload)
    header = json.loads(text)
    header["__metadata__"] = {
        "flcore": rng.choice(
            [
                deep(rng),
                json.dumps(META)[:-1] + ',"metrics":' + deep(rng) + "}",
                '{"a":1' + rng.choice(["", "}", "]", '"', "\\"]),
                json.dumps({**META, "num_samples": 10**400}),
                json.dumps(META) + "x",
            ]
        )
    }
    new = json.dumps(header, separators=(",", ":")).encode()
    return join(new + b" " * (-len(new) % 8), data)


def raw_header(rng: random.Random, payload: bytes) -> bytes:
    """A header that is no JSON object at all, or JSON a parser trips over."""
    _, data = split(payload)
    text = rng.choice(
        [
            deep(rng).encode(),
            b'{"w":' + deep(rng).encode() + b"}",
            b"\xff\xfe" + b"{}",
            b'{"w":"' + b'\\"' * 50_000 + b"}",
            b'"' + b'\\"' * 50_000,
            b'{"w":' + b"9" * 5000 + b"}",
            b'{"w":1e99999}',
            b"[" * 20 + b"]" * 19,
            b'{"__metadata__":{"flcore":"{}"}}' + b"\x00" * rng.randrange(9),
            json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode(),
        ]
    )
    return join(text, data)


def flip_bits(rng: random.Random, payload: bytes) -> bytes:
    damaged = bytearray(payload)
    for _ in range(rng.randint(1, 8)):
        damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
    return bytes(damaged)


def overwrite(rng: random.Random, payload: bytes) -> bytes:
    damaged = bytearray(payload)
    start = rng.randrange(len(damaged))
    damaged[start : start + rng.randint(1, 16)] = bytes(rng.randrange(256) for _ in range(16))
    return bytes(damaged)


def truncate(rng: random.Random, payload: bytes) -> bytes:
    return payload[: rng.randrange(len(payload) + 1)]


def extend(rng: random.Random, payload: bytes) -> bytes:
    return payload + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))


def length_prefix(rng: random.Random, payload: bytes) -> bytes:
    size = int.from_bytes(payload[:8], "little")
    new = rng.choice([0, 1, size - 1, size + 1, size + 8, 2**63, 2**64 - 1, len(payload)])
    return max(new, 0).to_bytes(8, "little") + payload[8:]


MUTATORS: list[Callable[[random.Random, bytes], bytes]] = [
    flip_bits,
    overwrite,
    truncate,
    extend,
    length_prefix,
    header_rewrite,
    header_rewrite,
    known_metadata,
    raw_header,
]


def decode_one(payload: bytes, rng: random.Random, counts: dict[str, int]) -> None:
    """Decode as a server does; what decodes goes on to the contribution checks."""
    data: bytes | bytearray = bytearray(payload) if rng.random() < 0.5 else payload
    try:
        tensors, meta = codec.decode(data, what="payload", copy=rng.random() < 0.5)
    except CodecError:
        counts["refused"] += 1
        return
    assert isinstance(tensors, dict) and isinstance(meta, dict)
    counts["decoded"] += 1
    try:
        contribution = Contribution.decode(bytearray(payload), sender="client-0")
        validate(contribution, reference=REFERENCE, round=2, clients={"client-0"}, received=set())
    except (CodecError, ContributionRefused):
        counts["contributions refused"] += 1
    else:
        counts["contributions accepted"] += 1


def test_mutated_payloads_only_ever_decode_or_raise_codec_errors(
    monkeypatch: pytest.MonkeyPatch, record_property: Callable[[str, object], None]
) -> None:
    from safetensors.torch import save

    ours = bytes(codec.encode(weights(), META))  # remembered: its header takes the fast path
    theirs = save(weights(), metadata={"flcore": json.dumps(META)})  # parsed in full
    rng = random.Random(SEED)
    counts = dict.fromkeys(
        ["tried", "refused", "decoded", "contributions refused", "contributions accepted"], 0
    )
    crashes: list[str] = []
    slowest = 0.0
    remembered = dict(codec._KNOWN)
    for i in range(INPUTS):
        mutate = MUTATORS[i % len(MUTATORS)]
        payload = mutate(rng, rng.choice([ours, theirs]))
        for known in (remembered, {}):  # both parse paths: remembered header, full parse
            monkeypatch.setattr(codec, "_KNOWN", dict(known))
            counts["tried"] += 1
            started = time.perf_counter()
            try:
                decode_one(payload, rng, counts)
            except Exception as err:  # anything but the codec's own refusal is a crash
                crashes.append(f"{mutate.__name__}: {type(err).__name__}: {err!s:.200}")
            slowest = max(slowest, time.perf_counter() - started)
    counts["crashed"] = len(crashes)
    summary = {**counts, "slowest_s": round(slowest, 4), "seed": SEED}
    print(f"\ncodec fuzz: {summary}")
    record_property("fuzz", json.dumps(summary))
    assert not crashes, crashes[:5]
    assert counts["refused"] > counts["tried"] // 2  # the mutations do reach the checks
    assert counts["contributions accepted"] > 0  # and harmless ones still decode
