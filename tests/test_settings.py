from __future__ import annotations

from typing import Literal

import attrs
import pytest
from attrs.validators import ge, le

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


@attrs.frozen
class Floats:
    """Float fields of every shape a plugin may declare."""

    rate: float = 0.5
    maybe: float | None = None
    steps: list[float] = attrs.field(factory=list)
    weights: dict[str, float] = attrs.field(factory=dict)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rate": float("nan")}, "job.toml: [x].rate: must be a finite number, got nan"),
        ({"rate": float("inf")}, "[x].rate: must be a finite number, got inf"),
        ({"rate": -float("inf")}, "[x].rate: must be a finite number, got -inf"),
        ({"rate": 10**400}, "[x].rate: must be a finite number, got an integer too large"),
        ({"maybe": float("nan")}, "[x].maybe: must be a finite number, got nan"),
        ({"steps": [0.1, float("inf")]}, "[x].steps[1]: must be a finite number, got inf"),
        ({"weights": {"a": float("nan")}}, "[x].weights.a: must be a finite number, got nan"),
    ],
)
def test_every_float_must_be_finite_whoever_declared_it(values: dict, message: str) -> None:
    """NaN passes every bound unnoticed and an infinite timeout overflows its wait."""
    with pytest.raises(JobError) as err:
        build_settings(Floats, values, "job.toml: [x]")
    assert message in str(err.value)


def test_finite_floats_and_ints_still_pass() -> None:
    got = build_settings(Floats, {"rate": 1e308, "maybe": -2, "steps": [0, 1.5]}, "[x]")
    assert got == Floats(rate=1e308, maybe=-2.0, steps=[0.0, 1.5])


@attrs.frozen
class Bounded:
    count: int = attrs.field(default=1, validator=[ge(1), le(5)])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "job.toml: [x].count: must be >= 1, got 0"),
        (9, "job.toml: [x].count: must be <= 5, got 9"),
    ],
)
def test_attrs_validators_refusals_name_the_key_and_the_bound(value: int, message: str) -> None:
    with pytest.raises(JobError) as err:
        build_settings(Bounded, {"count": value}, "job.toml: [x]")
    assert str(err.value) == message
