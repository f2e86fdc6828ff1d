"""The core's ``select_clients``: ``[job] clients_per_round`` clients, drawn per round.

The draw is seeded by the job's seed and the round alone, so every runtime, a resumed run
and a retried round train the same cohort.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from flcore.markers import hookimpl


@hookimpl
def select_clients(ctx: Any, clients: Sequence[str]) -> list[str]:
    from flcore.data import derive_seed

    wanted = ctx.job.job.clients_per_round
    if wanted is None or wanted >= len(clients):
        return list(clients)
    rng = random.Random(derive_seed(ctx.job.job.seed, "cohort", ctx.round))
    chosen = set(rng.sample(range(len(clients)), wanted))
    return [name for i, name in enumerate(clients) if i in chosen]
