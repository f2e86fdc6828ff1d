"""``[plugins.ray]``: where the Ray cluster is and what each virtual client may use.

Everything is checked when the job is loaded (and by ``flcore validate``), so a typo in an
address or a negative CPU count stops the job before Ray is even started.
"""

from __future__ import annotations

import math
import re
from typing import Any, Final

import attrs

#: ``host:port`` (a cluster's GCS address) or ``ray://host:port`` (Ray Client).
ADDRESS: Final = re.compile(r"(ray://)?[A-Za-z0-9.\-_\[\]:]+:\d{1,5}")
#: Ray's own special addresses: ``auto`` (the cluster ``ray start --head`` started on this
#: machine) and ``local`` (always a new local instance).
SPECIAL_ADDRESSES: Final = ("auto", "local")


def _address(_instance: object, attribute: Any, value: str | None) -> None:
    if value is None or value in SPECIAL_ADDRESSES or ADDRESS.fullmatch(value):
        return
    raise ValueError(
        f"{attribute.name} must be 'auto', 'local', 'host:port' or 'ray://host:port' "
        f"(or left out), got {value!r}"
    )


def _positive(_instance: object, attribute: Any, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{attribute.name} must be a finite number above 0, got {value}")


def _not_negative(_instance: object, attribute: Any, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{attribute.name} must be a finite number >= 0, got {value}")


def _at_least_one(_instance: object, attribute: Any, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")


@attrs.frozen
class RaySettings:
    """What ``[plugins.ray]`` may say; every key is optional."""

    #: Left out: the Ray instance this process already joined, else Ray's default (the
    #: cluster in ``RAY_ADDRESS`` or the one ``ray start --head`` started here, else a new
    #: local instance). ``auto``, ``local``, ``host:port`` and ``ray://host:port`` mean
    #: what they mean to ``ray.init``.
    address: str | None = attrs.field(default=None, validator=_address)
    #: CPUs one actor reserves; an actor runs one client at a time, so this is one client's.
    cpus_per_client: float = attrs.field(default=1.0, validator=_positive)
    #: GPUs one actor reserves (fractions share a GPU); 0: CPU only.
    gpus_per_client: float = attrs.field(default=0.0, validator=_not_negative)
    #: How many actors hold the clients; left out: as many as the cluster's CPUs (and GPUs)
    #: fit at the per-client resources, never more than there are clients.
    actors: int | None = attrs.field(default=None, validator=_at_least_one)
    #: How often Ray restarts an actor whose process died: a restarted actor loads its
    #: clients' data again and they answer from the next request on. 0: they are gone.
    max_restarts: int = attrs.field(default=1, validator=attrs.validators.ge(0))
    #: Seconds the actors may take to start (the cluster may have to free resources first).
    start_timeout: float = attrs.field(default=300.0, validator=_positive)
