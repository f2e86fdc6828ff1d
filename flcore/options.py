"""The core's own job sections, as attrs settings classes (``[job]``, ``[trainer]``, ``[local]``)."""

from __future__ import annotations

from typing import Any, Literal

import attrs


def _at_least(minimum: float) -> Any:
    def check(_instance: object, attribute: Any, value: float | None) -> None:
        if value is not None and value < minimum:
            raise ValueError(f"{attribute.name} must be at least {minimum}, got {value}")

    return check


@attrs.frozen
class JobSettings:
    """``[job]``: what to train, for how long, with how many clients."""

    task: str
    name: str = "flcore-job"
    rounds: int = attrs.field(default=1, validator=_at_least(1))
    clients: int = attrs.field(default=1, validator=_at_least(1))
    #: Clients sampled for each round (the cohort): seeded, uniform, without replacement;
    #: unset, every client takes part in every round.
    clients_per_round: int | None = attrs.field(default=None, validator=_at_least(1))
    #: Accepted contributions a round needs, counted within its cohort (default: all of it).
    min_clients: int | None = attrs.field(default=None, validator=_at_least(1))
    seed: int = 0
    runtime: str = "embedded"
    #: Worker processes for the clients (0: every client in the server's process).
    workers: int = attrs.field(default=0, validator=_at_least(0))
    #: torch threads for client work, the same on every runtime: float results depend on
    #: how a reduction is split, so this is what keeps runtimes byte-identical.
    threads: int = attrs.field(default=1, validator=_at_least(1))
    #: FedAvg's mean: true accumulates in float64 and rounds once (the correctly rounded
    #: mean); false keeps a running mean in the model's dtype (half the memory, about a
    #: plain copy's speed, a few units in the last place from the exact mean).
    exact_mean: bool = True
    #: What a failed round does: stop the run (keeping the last completed round) or try again.
    on_error: Literal["abort", "retry"] = "abort"
    max_retries: int = attrs.field(default=1, validator=_at_least(0))
    #: Keep every round's global model in ``rounds/NNNN/global_model.safetensors``.
    keep_round_models: bool = False
    #: Deployment (``flcore server``): the client names that may join, in data order (the
    #: client named ``allowed_clients[i]`` holds the data of index ``i``); default the
    #: simulation's names ``client-0`` ... ``client-N-1``.
    allowed_clients: list[str] | None = None
    #: Deployment: seconds a client has to answer one request before it is dropped.
    round_timeout: float = attrs.field(default=600.0, validator=_at_least(0.1))
    #: Deployment: clients beat this often (seconds); four missed beats drop a client.
    heartbeat_interval: float = attrs.field(default=5.0, validator=_at_least(0.05))
    #: Deployment: seconds the server waits for every allowed client before the first
    #: round (it starts earlier once all joined; with fewer than min_clients it stops).
    join_timeout: float = attrs.field(default=600.0, validator=_at_least(0.1))
    #: Deployment: the largest model or reply either side accepts, in MiB.
    max_message_mb: int = attrs.field(default=4096, validator=_at_least(1))

    def required_clients(self, cohort: int | None = None) -> int:
        """How many accepted contributions a round with ``cohort`` clients needs (default:
        the whole cohort; a cohort defaults to ``clients_per_round``, else every client)."""
        if cohort is None:
            cohort = self.clients_per_round or self.clients
        return cohort if self.min_clients is None else self.min_clients


@attrs.frozen
class TrainerOptions:
    """``[trainer]``: the DLR demonstrator's ``TrainerOptions``, with their meaning."""

    #: Never ask the clients to test the global model.
    skip_model_tests: bool = False
    #: Test after every round; when false, only after the last one.
    model_test_after_each_round: bool = True
    #: Drop the clients' models once aggregated; when false they are kept in the run directory.
    delete_local_models_after_aggregation: bool = True


@attrs.frozen
class LocalSettings:
    """``[local]``: the default local training on each client."""

    epochs: int = attrs.field(default=1, validator=_at_least(1))
    batch_size: int = attrs.field(default=32, validator=_at_least(1))
    lr: float = attrs.field(default=0.01, validator=_at_least(0.0))
    momentum: float = attrs.field(default=0.0, validator=_at_least(0.0))
    weight_decay: float = attrs.field(default=0.0, validator=_at_least(0.0))
    #: Fraction of each client's data held out to score received models (never trained on).
    validation_split: float = attrs.field(default=0.2, validator=_at_least(0.0))

    def __attrs_post_init__(self) -> None:
        if self.validation_split >= 1.0:
            raise ValueError(f"validation_split must be below 1, got {self.validation_split}")
