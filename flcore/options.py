"""The core's own job sections, as attrs settings classes (``[job]``, ``[trainer]``, ``[local]``).

Every bound is an attrs validator next to its field, and each limit below says why it is
where it is: a job that asks for more fails as it is read, naming the key, instead of
hanging or exhausting the machine once it runs.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import attrs
from attrs.validators import ge, le, lt, optional

#: The most clients a federation may have: ten times the 100,000 virtual clients of a
#: cross-device simulation. Their names are built when a job starts (tens of MB at the
#: limit), so a typo such as ``10**9`` fails here instead of filling the memory.
MAX_CLIENTS = 1_000_000
#: The most worker processes: each holds a model and the task's data.
MAX_WORKERS = 256
#: The largest model or reply, in MiB (64 GiB): far above any model a round sends, far
#: below what a declared size could make either side try to hold.
MAX_MESSAGE_MB = 65_536
#: The longest timeout or interval, in seconds (30 days): a deadline is waited on with
#: ``threading`` and ``grpc``, whose waits overflow on huge values (``inf``, ``1e300``).
MAX_SECONDS = 30 * 24 * 3600.0
#: torch's seed range: ``manual_seed`` refuses anything outside it.
SEED_RANGE = (-(2**63), 2**64 - 1)


def _at_most_cpus(_instance: object, attribute: Any, value: int) -> None:
    """More torch threads than the machine has CPUs only oversubscribe it (and ``10**6``
    of them exhaust libgomp's memory); said in attrs' words, so the key is named the same."""
    cpus = os.cpu_count()
    if cpus is not None and value > cpus:
        raise ValueError(
            f"'{attribute.name}' must be <= {cpus} (this machine's CPU count): {value}"
        )


@attrs.frozen
class JobSettings:
    """``[job]``: what to train, for how long, with how many clients."""

    task: str
    name: str = "flcore-job"
    rounds: int = attrs.field(default=1, validator=ge(1))
    #: How many clients the federation has, at most :data:`MAX_CLIENTS`.
    clients: int = attrs.field(default=1, validator=[ge(1), le(MAX_CLIENTS)])
    #: Clients sampled for each round (the cohort): seeded, uniform, without replacement;
    #: unset, every client takes part in every round.
    clients_per_round: int | None = attrs.field(default=None, validator=optional(ge(1)))
    #: Accepted contributions a round needs, counted within its cohort (default: all of it).
    min_clients: int | None = attrs.field(default=None, validator=optional(ge(1)))
    #: Within torch's seed range, :data:`SEED_RANGE`.
    seed: int = attrs.field(default=0, validator=[ge(SEED_RANGE[0]), le(SEED_RANGE[1])])
    runtime: str = "embedded"
    #: Worker processes for the clients (0: every client in the server's process), at most
    #: :data:`MAX_WORKERS`.
    workers: int = attrs.field(default=0, validator=[ge(0), le(MAX_WORKERS)])
    #: torch threads for client work, the same on every runtime: float results depend on
    #: how a reduction is split, so this is what keeps runtimes byte-identical. At most the
    #: CPU count of the machine that reads the job (the server, and each deployed client).
    threads: int = attrs.field(default=1, validator=[ge(1), _at_most_cpus])
    #: FedAvg's mean: true accumulates in float64 and rounds once (the correctly rounded
    #: mean); false keeps a running mean in the model's dtype (half the memory, about a
    #: plain copy's speed, a few units in the last place from the exact mean).
    exact_mean: bool = True
    #: What a failed round does: stop the run (keeping the last completed round) or try again.
    on_error: Literal["abort", "retry"] = "abort"
    max_retries: int = attrs.field(default=1, validator=ge(0))
    #: Keep every round's global model in ``rounds/NNNN/global_model.safetensors``.
    keep_round_models: bool = False
    #: Deployment (``flcore server``): the client names that may join, in data order (the
    #: client named ``allowed_clients[i]`` holds the data of index ``i``); default the
    #: simulation's names ``client-0`` ... ``client-N-1``.
    allowed_clients: list[str] | None = None
    #: Deployment: seconds a client has to answer one request before it is dropped (at most
    #: :data:`MAX_SECONDS`, as for every timeout).
    round_timeout: float = attrs.field(default=600.0, validator=[ge(0.1), le(MAX_SECONDS)])
    #: Deployment: clients beat this often (seconds); four missed beats drop a client. Below
    #: ``round_timeout``: beats any sparser could never notice a stall before the deadline.
    heartbeat_interval: float = attrs.field(default=5.0, validator=[ge(0.05), le(MAX_SECONDS)])
    #: Deployment: seconds the server waits for every allowed client before the first
    #: round (it starts earlier once all joined; with fewer than min_clients it stops).
    join_timeout: float = attrs.field(default=600.0, validator=[ge(0.1), le(MAX_SECONDS)])
    #: Deployment: the largest model or reply either side accepts, in MiB, at most
    #: :data:`MAX_MESSAGE_MB`.
    max_message_mb: int = attrs.field(default=4096, validator=[ge(1), le(MAX_MESSAGE_MB)])
    #: The largest ``num_samples`` a client may report, in a contribution or a validation
    #: reply: FedAvg weighs contributions by it, so one forged count would outweigh every
    #: honest client. At most 2**53, the largest count a float weight holds exactly.
    max_samples_per_client: int = attrs.field(default=10**9, validator=[ge(1), le(2**53)])

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

    epochs: int = attrs.field(default=1, validator=ge(1))
    batch_size: int = attrs.field(default=32, validator=ge(1))
    lr: float = attrs.field(default=0.01, validator=ge(0.0))
    momentum: float = attrs.field(default=0.0, validator=ge(0.0))
    weight_decay: float = attrs.field(default=0.0, validator=ge(0.0))
    #: Fraction of each client's data held out to score received models (never trained on).
    validation_split: float = attrs.field(default=0.2, validator=[ge(0.0), lt(1.0)])
