"""The hook this plugin adds to the chain: other plugins learn of a new best model here.

The core adds these specs to the run's PluginManager because the plugin object carries them
as ``flcore_hookspecs``; a plugin implements them with ``from flcore import hookimpl`` like
any core hook, and is called in chain order with the chain's rollback.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from flcore import hookspec

if TYPE_CHECKING:
    import torch

    from flcore import ServerContext
    from flcore_model_selection.record import BestModel


@hookspec
def best_model_selected(
    ctx: ServerContext, best: BestModel, weights: Mapping[str, torch.Tensor]
) -> None:
    """A global model beat the best so far and was written to ``best_model.safetensors``.

    Side: server. Fires in the event that scored it (``before_aggregation`` with
    ``source = "clients"``, ``after_aggregation`` with ``source = "server"``, ``end_round`` of
    the last round for the final model), after both files were written. ``best`` says which
    round's global model it is and how it scored; ``weights`` is that model, read-only. When
    a handler raises, the files and the selection are put back as they were at the round's
    start and the round fails.
    """
