"""Data plumbing for the defaults: seeds, a client's validation split, and batches."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from the job's seed and e.g. a round and a client: the same parts
    give the same seed in any process, which is what makes runtimes interchangeable."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def seed_torch(seed: int) -> None:
    """Seed torch's global generators (dropout and other random layers).

    ``torch.manual_seed`` would do it too, but while CUDA is not initialised it queues a lazy
    call per device type, each with a formatted stack trace: milliseconds per client and
    round deep inside a run, and a queue that only grows.
    """
    torch.random.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


def split_validation(data: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Hold out ``fraction`` of ``data`` (a seeded random subset) as the client's validation split."""
    n = len(data)
    n_val = round(n * fraction) if n > 1 else 0
    tensors = as_tensors(data)
    if n_val == 0 and tensors is not None:  # nothing held out: all of it, in its order
        return TensorDataset(*tensors), TensorDataset(*(t[:0] for t in tensors))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train_index, val_index = order[n_val:].sort().values, order[:n_val].sort().values
    if tensors is not None:
        return (
            TensorDataset(*(t[train_index] for t in tensors)),
            TensorDataset(*(t[val_index] for t in tensors)),
        )
    return Subset(data, train_index.tolist()), Subset(data, val_index.tolist())


def as_tensors(data: Any) -> tuple[torch.Tensor, ...] | None:
    """The dataset's tensors when it is a TensorDataset (or a Subset of one): then batches are
    sliced out in one indexing operation instead of collated item by item."""
    if isinstance(data, TensorDataset):
        return tuple(data.tensors)
    if isinstance(data, Subset) and isinstance(data.dataset, TensorDataset):
        index = torch.as_tensor(list(data.indices), dtype=torch.long)
        return tuple(t[index] for t in data.dataset.tensors)
    return None


def batches(
    data: Any,
    batch_size: int,
    generator: torch.Generator | None = None,
    tensors: tuple[torch.Tensor, ...] | None = None,
) -> Iterator[Any]:
    """Mini-batches of ``data``, shuffled by ``generator`` when given; ``tensors`` may carry
    :func:`as_tensors` of ``data`` already computed."""
    n = len(data)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    tensors = tensors if tensors is not None else as_tensors(data)
    if tensors is not None and len(tensors) == 2:  # inputs and targets: the common case
        inputs, targets = tensors
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            yield inputs[index], targets[index]
        return
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        if tensors is not None:
            yield tuple(t[index] for t in tensors)
        else:
            yield default_collate([data[i] for i in index.tolist()])
