from __future__ import annotations

from typing import Literal

import attrs
import pytest

from flcore.errors import JobError
from flcore.settings import build_settings


@attrs.frozen
class Example:
    name: str
    rate: float = 0.5
    count: int = 1
    flag: bool = False
    mode: Literal["max", "min"] = "max"
    tags: list[str] = attrs.field(factory=list)
    weights: dict[str, float] = attrs.field(factory=dict)
    limit: int | None = None
    choice: Literal["a", "b"] | None = None
    positive: int = attrs.field(default=1)

    @positive.validator
    def _check(self, attribute: attrs.Attribute, value: int) -> None:  # type: ignore[type-arg]
        if value < 1:
            raise ValueError("positive must be at least 1")


def test_values_are_checked_and_ints_accepted_as_floats() -> None:
    got = build_settings(
        Example,
        {"name": "a", "rate": 1, "tags": ["x"], "weights": {"c": 2}, "limit": 3},
        "job.toml: [x]",
    )
    assert got == Example(name="a", rate=1.0, tags=["x"], weights={"c": 2.0}, limit=3)
    assert isinstance(got.rate, float)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"name": "a", "colour": 1}, "job.toml: [x]: unknown key 'colour'"),
        ({"name": "a", "count": "3"}, "job.toml: [x].count: expected int, got str '3'"),
        ({"name": "a", "count": 1.5}, "[x].count: expected int"),
        ({"name": "a", "flag": 1}, "[x].flag: expected bool"),
        ({"name": "a", "count": True}, "[x].count: expected int, got bool"),
        ({"name": "a", "mode": "best"}, "[x].mode: 'best' is not one of 'max', 'min'"),
        ({"name": "a", "tags": "x"}, "[x].tags: expected"),
        ({"name": "a", "tags": [1]}, "[x].tags[0]: expected str"),
        ({"name": "a", "weights": {"c": "heavy"}}, "[x].weights.c: expected float"),
        ({}, "[x]: missing required key 'name'"),
        ({"name": "a", "choice": "c"}, "[x].choice: 'c' is not one of 'a', 'b'"),
        ({"name": "a", "limit": "3"}, "[x].limit: expected int, got str '3'"),
        ({"name": "a", "positive": 0}, "[x]: positive must be at least 1"),
    ],
)
def test_bad_values_name_the_key(values: dict, message: str) -> None:
    with pytest.raises(JobError) as err:
        build_settings(Example, values, "job.toml: [x]")
    assert message in str(err.value)


def test_a_class_that_is_not_attrs_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        build_settings(dict, {}, "x")
