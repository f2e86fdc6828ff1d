"""What an actor sends back is checked before the trainer sees it: a codec payload or an
error message, nothing else. (The payload itself is then checked by the core's codec.)"""

from __future__ import annotations

from typing import Any

import pytest
from flcore_ray.runtime import read_answer

from flcore import encode_tensors


def test_a_reply_or_an_error_is_passed_on() -> None:
    payload = encode_tensors({}, {"kind": "x"})
    assert read_answer((payload, None), "client-3").payload == payload
    assert read_answer((bytes(payload), None), "client-3").error is None
    failed = read_answer((None, "ValueError: no"), "client-3")
    assert (failed.client_id, failed.payload, failed.error) == ("client-3", None, "ValueError: no")


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"bytes alone",
        ("too", "many", "items"),
        ("text", None),
        (b"reply", "and an error"),
        (None, None),
        (None, 17),
        [b"a list", None],
        {"payload": b""},
    ],
)
def test_anything_else_is_that_clients_error(value: Any) -> None:
    result = read_answer(value, "client-0")
    assert result.payload is None
    assert result.error == f"its actor answered {type(value).__name__}, not a reply"
