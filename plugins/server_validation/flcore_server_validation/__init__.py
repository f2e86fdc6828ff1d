"""Clara's ServerValidationHandler for flcore: score the global model on the server.

Name ``server_validation`` in a job's ``[plugins] chain``; settings go in
``[plugins.server_validation]`` (:class:`ServerValidationSettings`). On every N-th round and
the last, the new global model is scored on the task's ``server_data()`` and the metrics land
in ``ctx.metrics["server"]`` (``metrics.jsonl``, the console) and
``ctx.state["server_validation"]``.
"""

from __future__ import annotations

from flcore_server_validation.evaluator import Evaluator, EvaluatorError, checked_metrics
from flcore_server_validation.handler import (
    METRICS_KEY,
    PLUGIN_NAME,
    ServerValidationHandler,
    validation_due,
)
from flcore_server_validation.settings import ServerValidationSettings

__all__ = [
    "METRICS_KEY",
    "PLUGIN_NAME",
    "Evaluator",
    "EvaluatorError",
    "ServerValidationHandler",
    "ServerValidationSettings",
    "checked_metrics",
    "validation_due",
]
