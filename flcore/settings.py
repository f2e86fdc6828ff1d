"""Validate a TOML section against an attrs settings class, naming the key on error.

Plugins, the task and the core's own sections declare their settings as attrs
classes; this module checks the values a job gives them before anything trains. Every float
a job gives must be finite, whoever declared it: NaN passes every comparison test and an
infinite timeout overflows whatever waits on it. Bounds are the classes' own attrs
validators (``attrs.validators.ge``/``le``); their refusals name the key like every other.
"""

from __future__ import annotations

import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import attrs

from flcore.errors import JobError

T = TypeVar("T")


def build_settings(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    """Return ``cls(**values)`` after checking every key and type; ``where`` names the section."""
    if not attrs.has(cls):
        raise TypeError(f"{cls!r} is not an attrs class")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in attrs.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise JobError(
            f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(fields)) or 'none'}"
        )
    checked = {}
    for name, value in values.items():
        checked[name] = coerce(value, hints.get(name, Any), f"{where}.{name}")
    missing = [n for n, f in fields.items() if f.default is attrs.NOTHING and n not in checked]
    if missing:
        raise JobError(f"{where}: missing required key {missing[0]!r}")
    try:
        return cls(**checked)  # type: ignore[return-value]
    except (ValueError, TypeError) as err:
        raise _refused(str(err), where, fields) from err


#: What attrs' number validators (``ge``, ``le``, ``lt``, ``gt``) say: ``'key' must be >= 1: 0``.
_BOUND_MESSAGE = re.compile(r"'(?P<key>[^']+)' (?P<rule>must be [<>]=? [^:]+): (?P<got>.*)")


def _refused(message: str, where: str, fields: Mapping[str, Any]) -> JobError:
    """A validator's refusal as a JobError; a bound names the key the way a type error does
    (``[job].rounds: must be >= 1, got 0``), other messages keep their own wording."""
    match = _BOUND_MESSAGE.fullmatch(message)
    if match is None or match["key"] not in fields:
        return JobError(f"{where}: {message}")
    return JobError(f"{where}.{match['key']}: {match['rule']}, got {match['got']}")


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a type annotation; ints are accepted where floats are."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return coerce(value, option, where)
            except JobError as err:
                errors.append((option, err))
        real = [err for option, err in errors if option is not type(None)]
        if value is not None and len(real) == 1:
            raise real[0]  # Optional[X]: say what X wanted, not "expected Optional"
        raise _wrong(where, value, annotation)
    if annotation is type(None):
        if value is None:
            return None
        raise _wrong(where, value, annotation)
    if origin is Literal:
        if value in args:
            return value
        raise JobError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _wrong(where, value, annotation)
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _wrong(where, value, annotation)
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return _finite(value, where)
        raise _wrong(where, value, annotation)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _wrong(where, value, annotation)
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _wrong(where, value, annotation)
        item = args[0] if args else Any
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise _wrong(where, value, annotation)
        val_type = args[1] if len(args) == 2 else Any
        return {str(k): coerce(v, val_type, f"{where}.{k}") for k, v in value.items()}
    if isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise _wrong(where, value, annotation)


def _finite(value: int | float, where: str) -> float:
    """``value`` as a float, refused unless it is finite."""
    try:
        number = float(value)
    except OverflowError:  # an int beyond the largest float
        raise JobError(f"{where}: must be a finite number, got an integer too large") from None
    if not math.isfinite(number):
        raise JobError(f"{where}: must be a finite number, got {number!r}")
    return number


def _wrong(where: str, value: Any, annotation: Any) -> JobError:
    expected = getattr(annotation, "__name__", None) or str(annotation)
    return JobError(f"{where}: expected {expected}, got {type(value).__name__} {value!r}")
