"""Clara's ModelSelectionHandler for flcore: keep the best global model.

Name ``model_selection`` in a job's ``[plugins] chain``; settings go in
``[plugins.model_selection]`` (:class:`ModelSelectionSettings`). Each global model is scored by the
clients' validation of it (or the server's, ``source = "server"``); the best is kept in the
run directory as ``best_model.safetensors`` with ``best_model.json`` beside it, and announced
through the ``best_model_selected`` hook (:mod:`flcore_model_selection.hookspecs`).
"""

from __future__ import annotations

from flcore_model_selection.files import MODEL_FILE, RECORD_FILE, BestModelFiles
from flcore_model_selection.handler import PLUGIN_NAME, ModelSelectionHandler, validation_view
from flcore_model_selection.record import BestModel
from flcore_model_selection.scoring import (
    ClientScore,
    Score,
    Unusable,
    client_weight,
    is_better,
    read_metric,
    weighted_score,
)
from flcore_model_selection.settings import ModelSelectionSettings, looks_lower_is_better

__all__ = [
    "MODEL_FILE",
    "PLUGIN_NAME",
    "RECORD_FILE",
    "BestModel",
    "BestModelFiles",
    "ClientScore",
    "ModelSelectionHandler",
    "ModelSelectionSettings",
    "Score",
    "Unusable",
    "client_weight",
    "is_better",
    "looks_lower_is_better",
    "read_metric",
    "validation_view",
    "weighted_score",
]
