"""flcore: a federated-learning core made of pluggy plugins.

This module is the whole public API: what plugin and runtime authors use, and nothing else
(a test fails when a plugin in this repository imports anything that is not here).
``from flcore import hookimpl`` is all a plugin needs to start. The rest is imported on
first use, so that importing flcore (and ``flcore --help``) does not load torch.

- hooks: ``hookimpl``, ``hookspec`` (every hook is in :mod:`flcore.hookspecs`);
- contexts: ``ServerContext``, ``ClientContext`` (``FLContext`` is what they share);
- contributions: ``Contribution``, FedAvg's ``WeightedMean`` / ``weighted_mean``;
- errors: ``FLCoreError`` and its kinds;
- jobs: ``Job``, its sections, ``run_job`` / ``RunResult``;
- the DLR trainer: ``ModelTrainer``, its events, ``process_trainer_task``;
- runtimes: ``Runtime``, ``ClientResult``, ``ClientHost``, ``client_job_text``,
  ``preload_client_modules``;
- tensors as bytes (never pickles): ``encode_tensors``, ``decode_tensors``,
  ``save_tensors``, ``load_tensors``, ``write_atomic``, ``Payload``;
- a local trainer's helpers: ``derive_seed``, ``seed_torch``, ``batches``, ``as_tensors``,
  ``loss_function``, ``primary_metric``;
- predictions: ``load_run``, ``LoadedRun``, ``predict_run``, ``global_model_prediction``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flcore.markers import hookimpl, hookspec

if TYPE_CHECKING:
    from flcore.aggregation import WeightedMean, weighted_mean
    from flcore.codec import Payload, write_atomic
    from flcore.codec import decode as decode_tensors
    from flcore.codec import encode as encode_tensors
    from flcore.codec import load_file as load_tensors
    from flcore.codec import save_file as save_tensors
    from flcore.context import ClientContext, FLContext, ServerContext
    from flcore.contribution import Contribution
    from flcore.data import as_tensors, batches, derive_seed, seed_torch
    from flcore.defaults.evaluation import loss_function, primary_metric
    from flcore.defaults.evaluation import predict as global_model_prediction
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
    from flcore.predict import LoadedRun, load_run
    from flcore.predict import predict as predict_run
    from flcore.run import RunResult, run_job
    from flcore.runtime.base import ClientResult, Runtime
    from flcore.runtime.base import job_for_remote_clients as client_job_text
    from flcore.runtime.host import ClientHost, preload_client_modules
    from flcore.trainer import (
        ModelTestFinished,
        ModelTrainer,
        ModelTrainerEvent,
        TrainingRoundFinished,
        process_trainer_task,
    )
    from flcore.training import RunFailed

#: name -> (module, attribute): imported on first use.
_LAZY = {
    "FLContext": ("flcore.context", "FLContext"),
    "ServerContext": ("flcore.context", "ServerContext"),
    "ClientContext": ("flcore.context", "ClientContext"),
    "Contribution": ("flcore.contribution", "Contribution"),
    "WeightedMean": ("flcore.aggregation", "WeightedMean"),
    "weighted_mean": ("flcore.aggregation", "weighted_mean"),
    "FLCoreError": ("flcore.errors", "FLCoreError"),
    "JobError": ("flcore.errors", "JobError"),
    "PluginError": ("flcore.errors", "PluginError"),
    "CodecError": ("flcore.errors", "CodecError"),
    "ContributionRefused": ("flcore.errors", "ContributionRefused"),
    "RoundFailed": ("flcore.errors", "RoundFailed"),
    "HandlerFailed": ("flcore.errors", "HandlerFailed"),
    "RunFailed": ("flcore.training", "RunFailed"),
    "Job": ("flcore.job", "Job"),
    "JobSettings": ("flcore.options", "JobSettings"),
    "LocalSettings": ("flcore.options", "LocalSettings"),
    "TrainerOptions": ("flcore.options", "TrainerOptions"),
    "run_job": ("flcore.run", "run_job"),
    "RunResult": ("flcore.run", "RunResult"),
    "ModelTrainer": ("flcore.trainer", "ModelTrainer"),
    "ModelTrainerEvent": ("flcore.trainer", "ModelTrainerEvent"),
    "TrainingRoundFinished": ("flcore.trainer", "TrainingRoundFinished"),
    "ModelTestFinished": ("flcore.trainer", "ModelTestFinished"),
    "process_trainer_task": ("flcore.trainer", "process_trainer_task"),
    "Runtime": ("flcore.runtime.base", "Runtime"),
    "ClientResult": ("flcore.runtime.base", "ClientResult"),
    "ClientHost": ("flcore.runtime.host", "ClientHost"),
    "client_job_text": ("flcore.runtime.base", "job_for_remote_clients"),
    "preload_client_modules": ("flcore.runtime.host", "preload_client_modules"),
    "Payload": ("flcore.codec", "Payload"),
    "encode_tensors": ("flcore.codec", "encode"),
    "decode_tensors": ("flcore.codec", "decode"),
    "save_tensors": ("flcore.codec", "save_file"),
    "load_tensors": ("flcore.codec", "load_file"),
    "write_atomic": ("flcore.codec", "write_atomic"),
    "derive_seed": ("flcore.data", "derive_seed"),
    "seed_torch": ("flcore.data", "seed_torch"),
    "batches": ("flcore.data", "batches"),
    "as_tensors": ("flcore.data", "as_tensors"),
    "loss_function": ("flcore.defaults.evaluation", "loss_function"),
    "primary_metric": ("flcore.defaults.evaluation", "primary_metric"),
    "LoadedRun": ("flcore.predict", "LoadedRun"),
    "load_run": ("flcore.predict", "load_run"),
    "predict_run": ("flcore.predict", "predict"),
    "global_model_prediction": ("flcore.defaults.evaluation", "predict"),
}

__all__ = [
    "hookimpl",
    "hookspec",
    "FLContext",
    "ServerContext",
    "ClientContext",
    "Contribution",
    "WeightedMean",
    "weighted_mean",
    "FLCoreError",
    "JobError",
    "PluginError",
    "CodecError",
    "ContributionRefused",
    "RoundFailed",
    "HandlerFailed",
    "RunFailed",
    "Job",
    "JobSettings",
    "LocalSettings",
    "TrainerOptions",
    "run_job",
    "RunResult",
    "ModelTrainer",
    "ModelTrainerEvent",
    "TrainingRoundFinished",
    "ModelTestFinished",
    "process_trainer_task",
    "Runtime",
    "ClientResult",
    "ClientHost",
    "client_job_text",
    "preload_client_modules",
    "Payload",
    "encode_tensors",
    "decode_tensors",
    "save_tensors",
    "load_tensors",
    "write_atomic",
    "derive_seed",
    "seed_torch",
    "batches",
    "as_tensors",
    "loss_function",
    "primary_metric",
    "LoadedRun",
    "load_run",
    "predict_run",
    "global_model_prediction",
]


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'flcore' has no attribute {name!r}")
    value = getattr(importlib.import_module(where[0]), where[1])
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
