from __future__ import annotations

import numpy as np
import pytest

from examples.digits import Task, dirichlet_partition, iid_partition


def test_iid_partitions_deal_every_index_once() -> None:
    parts = iid_partition(103, 10, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    assert {len(p) for p in parts} <= {10, 11}


def test_dirichlet_partitions_are_complete_skewed_and_never_empty() -> None:
    labels = np.repeat(np.arange(10), 30)
    parts = dirichlet_partition(labels, 8, alpha=0.1, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(300))
    assert all(len(p) > 0 for p in parts)
    label_counts = [len(set(labels[p].tolist())) for p in parts]
    assert min(label_counts) < 10  # small alpha: some clients miss classes


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_clients_data_is_disjoint_and_server_data_is_held_out(partition: str) -> None:
    task = Task(partition=partition, classes=[0, 1, 2])
    sizes = [len(task.client_data(i, 4)) for i in range(4)]
    server = task.server_data()
    assert set(server.tensors[1].unique().tolist()) == {0, 1, 2}
    total = sum(sizes) + len(server)
    assert 500 < total < 560  # the three classes of the 1797 digits
    assert task.model()(server.tensors[0][:2]).shape == (2, 10)
