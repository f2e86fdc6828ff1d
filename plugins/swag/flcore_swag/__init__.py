"""Federated SWAG (Maddox et al. 2019) for flcore: ``swag`` in a job's chain adds SWAG rounds
after training, writes the posterior to the run directory, and answers ``predict`` with a
Bayesian model average and its uncertainties.

Only the plugin class is imported eagerly (``flcore plugins`` loads it); the rest on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flcore_swag.plugin import SWAGPlugin
from flcore_swag.settings import Settings

if TYPE_CHECKING:
    from flcore_swag.aggregation import moment_match
    from flcore_swag.moments import ClientMoments, Gaussian, SnapshotMoments
    from flcore_swag.posterior import Posterior
    from flcore_swag.predict import bayesian_model_average
    from flcore_swag.trainer import SWAGModelTrainer, SWAGRoundFinished

_LAZY = {
    "moment_match": "flcore_swag.aggregation",
    "ClientMoments": "flcore_swag.moments",
    "Gaussian": "flcore_swag.moments",
    "SnapshotMoments": "flcore_swag.moments",
    "Posterior": "flcore_swag.posterior",
    "bayesian_model_average": "flcore_swag.predict",
    "SWAGModelTrainer": "flcore_swag.trainer",
    "SWAGRoundFinished": "flcore_swag.trainer",
}

__all__ = [
    "SWAGPlugin",
    "Settings",
    "moment_match",
    "ClientMoments",
    "Gaussian",
    "SnapshotMoments",
    "Posterior",
    "bayesian_model_average",
    "SWAGModelTrainer",
    "SWAGRoundFinished",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flcore_swag' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
