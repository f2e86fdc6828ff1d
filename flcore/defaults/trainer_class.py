"""The core's answer to ``get_trainer_class``: the plain :class:`ModelTrainer`."""

from __future__ import annotations

from typing import Any

from flcore.markers import hookimpl


@hookimpl
def get_trainer_class(ctx: Any) -> type:
    from flcore.trainer import ModelTrainer

    return ModelTrainer
