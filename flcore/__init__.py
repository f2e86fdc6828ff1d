"""flcore: a federated-learning core made of pluggy plugins.

``from flcore import hookimpl`` is all a plugin needs. The rest of the public surface is
imported on first use, so that importing flcore (and ``flcore --help``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flcore.markers import hookimpl, hookspec

if TYPE_CHECKING:
    from flcore.aggregation import WeightedMean, weighted_mean
    from flcore.chain import Chain
    from flcore.context import FLContext
    from flcore.contribution import Contribution
    from flcore.errors import (
        CodecError,
        ContributionRefused,
        FLCoreError,
        HandlerFailed,
        JobError,
        PluginError,
        RoundFailed,
    )
    from flcore.job import Job
    from flcore.options import JobSettings, LocalSettings, TrainerOptions
    from flcore.run import RunResult, run_job
    from flcore.trainer import (
        ModelTestFinished,
        ModelTrainer,
        ModelTrainerEvent,
        TrainingRoundFinished,
        process_trainer_task,
    )
    from flcore.training import RunFailed, Training

_LAZY = {
    "WeightedMean": "flcore.aggregation",
    "weighted_mean": "flcore.aggregation",
    "Chain": "flcore.chain",
    "FLContext": "flcore.context",
    "Contribution": "flcore.contribution",
    "CodecError": "flcore.errors",
    "ContributionRefused": "flcore.errors",
    "FLCoreError": "flcore.errors",
    "HandlerFailed": "flcore.errors",
    "JobError": "flcore.errors",
    "PluginError": "flcore.errors",
    "RoundFailed": "flcore.errors",
    "Job": "flcore.job",
    "JobSettings": "flcore.options",
    "LocalSettings": "flcore.options",
    "TrainerOptions": "flcore.options",
    "RunResult": "flcore.run",
    "run_job": "flcore.run",
    "ModelTestFinished": "flcore.trainer",
    "ModelTrainer": "flcore.trainer",
    "ModelTrainerEvent": "flcore.trainer",
    "TrainingRoundFinished": "flcore.trainer",
    "process_trainer_task": "flcore.trainer",
    "RunFailed": "flcore.training",
    "Training": "flcore.training",
}

__all__ = [
    "hookimpl",
    "hookspec",
    "WeightedMean",
    "weighted_mean",
    "Chain",
    "FLContext",
    "Contribution",
    "CodecError",
    "ContributionRefused",
    "FLCoreError",
    "HandlerFailed",
    "JobError",
    "PluginError",
    "RoundFailed",
    "Job",
    "JobSettings",
    "LocalSettings",
    "TrainerOptions",
    "RunResult",
    "run_job",
    "ModelTestFinished",
    "ModelTrainer",
    "ModelTrainerEvent",
    "TrainingRoundFinished",
    "process_trainer_task",
    "RunFailed",
    "Training",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flcore' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
