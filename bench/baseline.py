"""The floor: a bare torch loop doing exactly the work a federated job does.

Same model and initialisation, same client partitions, same per-client seeds and batch
orders, same local SGD steps, the same sample-weighted mean (float64 accumulation) — and
nothing else: no serialization, no events, no validation, no files.

:class:`ParallelBareLoop` is the same loop parallelised by hand, the least any parallel
runtime has to do: it is what case B2 is measured against besides the single loop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from flcore.data import derive_seed, seed_torch


def bare_fedavg(
    task: Any,
    clients: int,
    rounds: int,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    indices: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """The job's final weights. ``indices`` trains only those of the ``clients`` (a share of
    the work, for measuring what running shares side by side costs)."""
    seed_torch(seed)
    model = task.model()
    global_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shares = range(clients) if indices is None else indices
    data = [(i, task.client_data(i, clients).tensors) for i in shares]
    for round_ in range(1, rounds + 1):
        sums: dict[str, torch.Tensor] = {}
        total = 0
        for index, (x, y) in data:
            model.load_state_dict(global_weights)
            local_sgd(model, x, y, seed, round_, index, epochs, batch_size, lr)
            add_weighted(sums, model.state_dict(), len(y))
            total += len(y)
        global_weights = mean(sums, total, global_weights)
    return global_weights


def local_sgd(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    round_: int,
    index: int,
    epochs: int,
    batch_size: int,
    lr: float,
) -> None:
    """One client's local training in one round, seeded as a job seeds it."""
    client_seed = derive_seed(seed, "train", round_, f"client-{index}")  # the default name
    seed_torch(client_seed)
    generator = torch.Generator().manual_seed(client_seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()


def add_weighted(sums: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], n: int) -> None:
    """Add ``n`` times ``weights`` to the float64 ``sums``, in the order clients are taken."""
    for name, tensor in weights.items():
        if name in sums:
            sums[name].add_(tensor, alpha=n)
        else:
            sums[name] = tensor.to(torch.float64, copy=True).mul_(n)


def mean(
    sums: dict[str, torch.Tensor], total: int, like: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    return {k: (v / total).to(like[k].dtype) for k, v in sums.items()}


class ParallelBareLoop:
    """:func:`bare_fedavg` parallelised by hand: :meth:`run` gives ``(seconds, weights)``.

    ``processes`` processes, started and warmed here, before any clock starts, each train
    their share of the clients (dealt round-robin, as the pool deals them); this process
    folds each client's weights into the float64 mean in client order as they come and hands
    the mean out for the next round. Weights cross in shared memory, one copy each way, and
    nothing checks them. So it is what any parallel runtime must at least do on this
    machine: train the clients side by side, wait for the round's last client, and average
    on the same cores. The final weights are :func:`bare_fedavg`'s bit for bit. The
    processes wait between runs, so that runs can alternate with other measurements.
    """

    def __init__(
        self,
        task: Any,
        clients: int,
        rounds: int,
        epochs: int,
        batch_size: int,
        lr: float,
        seed: int,
        processes: int,
    ) -> None:
        import torch.multiprocessing as mp

        context = mp.get_context("spawn")
        self.clients, self.rounds = clients, rounds
        seed_torch(seed)
        self.initial = {k: v.detach().clone() for k, v in task.model().state_dict().items()}
        self.sizes = [len(task.client_data(i, clients)) for i in range(clients)]
        self.shared = _SharedWeights(self.initial, clients)
        self.start, self.ready = context.Barrier(processes + 1), context.SimpleQueue()
        self.round = context.Value("i", 0)  # the round to train; 0: stop
        local = (epochs, batch_size, lr, seed)
        self.workers = [
            context.Process(
                target=_train_share,
                args=(
                    task,
                    clients,
                    list(range(p, clients, processes)),
                    local,
                    self.shared,
                    self.start,
                    self.ready,
                    self.round,
                ),
                daemon=True,
            )
            for p in range(processes)
        ]
        for worker in self.workers:
            worker.start()

    def run(self) -> tuple[float, dict[str, torch.Tensor]]:
        """One run of every round: its seconds, and the final weights."""
        shared, final = self.shared, self.initial
        shared.put_global(final)
        begin = time.perf_counter()
        for round_ in range(1, self.rounds + 1):
            self.round.value = round_
            self.start.wait()  # the global model is in place: the workers train the round
            sums: dict[str, torch.Tensor] = {}
            arrived: set[int] = set()
            for index in range(self.clients):  # in client order, as the loop adds them
                while index not in arrived:
                    arrived.add(self.ready.get())
                add_weighted(sums, shared.client(index), self.sizes[index])
            final = mean(sums, sum(self.sizes), self.initial)
            shared.put_global(final)
        seconds = time.perf_counter() - begin
        return seconds, {k: v.clone() for k, v in final.items()}

    def close(self) -> None:
        self.round.value = 0
        self.start.wait()
        for worker in self.workers:
            worker.join()


class _SharedWeights:
    """The global model and one slot per client, each a state dict of views into shared
    memory (given to the worker processes with the tensors' file descriptors)."""

    def __init__(self, like: dict[str, torch.Tensor], clients: int) -> None:
        self.shapes = {k: (v.shape, v.dtype) for k, v in like.items()}
        self.global_ = self._make()
        self.slots = [self._make() for _ in range(clients)]

    def _make(self) -> dict[str, torch.Tensor]:
        return {k: torch.empty(s, dtype=d).share_memory_() for k, (s, d) in self.shapes.items()}

    def put_global(self, weights: dict[str, torch.Tensor]) -> None:
        for name, tensor in weights.items():
            self.global_[name].copy_(tensor)

    def client(self, index: int) -> dict[str, torch.Tensor]:
        return self.slots[index]


def _train_share(
    task: Any,
    clients: int,
    indices: list[int],
    local: tuple[int, int, float, int],
    shared: _SharedWeights,
    start: Any,
    ready: Any,
    round_: Any,
) -> None:
    """One worker of :class:`ParallelBareLoop`: trains its clients each round it is given."""
    epochs, batch_size, lr, seed = local
    torch.set_num_threads(1)
    model = task.model()
    data = [(i, task.client_data(i, clients).tensors) for i in indices]
    index, (x, y) = data[0]
    local_sgd(model, x, y, seed, 0, index, epochs, batch_size, lr)  # warm, as the loop is
    while True:
        start.wait()
        current = round_.value  # set before the barrier, changed after the round's last
        if current == 0:
            return
        for index, (x, y) in data:
            model.load_state_dict(shared.global_)
            local_sgd(model, x, y, seed, current, index, epochs, batch_size, lr)
            slot = shared.client(index)
            for name, tensor in model.state_dict().items():
                slot[name].copy_(tensor)
            ready.put(index)
