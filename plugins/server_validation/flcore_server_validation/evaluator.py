"""The evaluator that scores the global model (Clara's ``ModelEvaluator``), and the check of
what it returns.

An evaluator is the user's choice: the chain's ``evaluate`` hook by default, or a callable
named by import path in the job file. The job file is trusted; nothing a client sent is ever
imported. Whatever the evaluator returns is checked before it reaches the metrics, so a
wrong value is an error naming the evaluator rather than a corrupt ``metrics.jsonl`` or a
model selected by NaN.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import reprlib
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from flcore import FLCoreError, JobError

if TYPE_CHECKING:
    import torch

    from flcore import ServerContext

#: How the default evaluator is named in messages and in the event log.
HOOK_EVALUATOR = "the chain's 'evaluate' hook"

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60


class EvaluatorError(FLCoreError):
    """An evaluator failed or returned something other than metric name -> finite number."""


@attrs.frozen
class Evaluator:
    """A named scoring function; calling it returns checked metrics."""

    #: How messages name it: the import path, or :data:`HOOK_EVALUATOR`.
    name: str
    function: Callable[[ServerContext, torch.nn.Module, Any], Any] = attrs.field(repr=False)

    def __call__(self, ctx: ServerContext, model: torch.nn.Module, data: Any) -> dict[str, float]:
        """Score ``model`` on ``data``; raise :class:`EvaluatorError` naming this evaluator."""
        try:
            result = self.function(ctx, model, data)
        except FLCoreError:
            raise  # already names the plugin that failed
        except Exception as err:
            raise EvaluatorError(
                f"evaluator {self.name} raised {type(err).__name__}: {err}"
            ) from err
        return checked_metrics(result, self.name)


def hook_evaluator() -> Evaluator:
    """The default: whichever plugin answers ``evaluate`` first (the core answers last)."""
    return Evaluator(
        HOOK_EVALUATOR, lambda ctx, model, data: ctx.ask("evaluate", model=model, data=data)
    )


def import_evaluator(path: str, where: str) -> Evaluator:
    """Import ``"package.module:function"``; any problem is a :class:`JobError` that starts
    with ``where`` (the setting) and names the path."""
    module_name, colon, attribute = path.partition(":")
    if not colon or not module_name.strip() or not attribute.strip():
        raise JobError(
            f"{where}: {path!r} is not an import path of the form 'package.module:function'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the user's module failing as it runs
        raise JobError(
            f"{where}: cannot import module {module_name!r} of evaluator {path!r}: "
            f"{type(err).__name__}: {err}"
        ) from err
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise JobError(
                f"{where}: evaluator {path!r}: {module_name!r} has no attribute {attribute!r}"
            ) from None
    if not callable(obj):
        raise JobError(
            f"{where}: evaluator {path!r} is a {type(obj).__name__}, not a callable "
            "taking (model, data)"
        )
    try:
        inspect.signature(obj).bind(None, None)
    except TypeError as err:
        raise JobError(
            f"{where}: evaluator {path!r} cannot be called as evaluator(model, data): {err}"
        ) from None
    except ValueError:
        pass  # no signature to inspect (a builtin): the call itself will tell
    function = obj
    return Evaluator(repr(path), lambda ctx, model, data: function(model, data))


def checked_metrics(result: Any, evaluator: str) -> dict[str, float]:
    """``result`` as ``{name: float}``: a non-empty mapping of non-empty string names to
    finite real numbers (a one-element tensor counts). Anything else is an
    :class:`EvaluatorError` naming ``evaluator``."""
    short = _repr.repr
    if not isinstance(result, Mapping):
        raise EvaluatorError(
            f"evaluator {evaluator} returned {type(result).__name__} {short(result)}, "
            "not a mapping of metric name to number"
        )
    if not result:
        raise EvaluatorError(f"evaluator {evaluator} returned no metrics (an empty mapping)")
    metrics: dict[str, float] = {}
    for name, value in result.items():
        if not isinstance(name, str) or not name:
            raise EvaluatorError(
                f"evaluator {evaluator} returned the metric name {short(name)}; "
                "names must be non-empty strings"
            )
        number = _as_number(value)
        if number is None:
            raise EvaluatorError(
                f"evaluator {evaluator} returned a non-numeric value for metric {name!r}: "
                f"{type(value).__name__} {short(value)}"
            )
        if not math.isfinite(number):
            raise EvaluatorError(
                f"evaluator {evaluator} returned a non-finite value for metric {name!r}: {number}"
            )
        metrics[name] = number
    return metrics


def _as_number(value: Any) -> float | None:
    """A real number (not a bool) or a one-element real tensor, as a float; else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    torch = sys.modules.get("torch")  # a tensor implies torch is loaded: never import it here
    if (
        torch is not None
        and isinstance(value, torch.Tensor)
        and value.numel() == 1
        and not value.is_complex()
        and value.dtype is not torch.bool
    ):
        return float(value.item())
    return None
