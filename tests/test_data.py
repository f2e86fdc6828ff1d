from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset

from flcore.data import as_tensors, batches, derive_seed, split_validation


def test_seeds_are_stable_and_distinct() -> None:
    assert derive_seed(0, "train", 1, "client-0") == derive_seed(0, "train", 1, "client-0")
    assert derive_seed(0, "train", 1, "client-0") != derive_seed(0, "train", 1, "client-1")
    assert 0 <= derive_seed(1, 2) < 2**63


def test_the_validation_split_is_disjoint_seeded_and_complete() -> None:
    data = TensorDataset(torch.arange(50.0), torch.arange(50))
    train, val = split_validation(data, 0.2, seed=3)
    assert len(train) == 40 and len(val) == 10
    ids = sorted(train.tensors[1].tolist() + val.tensors[1].tolist())
    assert ids == list(range(50))
    again = split_validation(data, 0.2, seed=3)[1]
    assert torch.equal(again.tensors[1], val.tensors[1])
    assert not torch.equal(split_validation(data, 0.2, seed=4)[1].tensors[1], val.tensors[1])
    assert len(split_validation(data, 0.0, seed=3)[1]) == 0


class ListData(Dataset):
    def __init__(self, n: int) -> None:
        self.items = [(torch.tensor([float(i)]), i) for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def test_batches_cover_every_item_once_for_any_dataset() -> None:
    for data in (TensorDataset(torch.arange(10.0)[:, None], torch.arange(10)), ListData(10)):
        seen = []
        for x, y in batches(data, 3, torch.Generator().manual_seed(0)):
            assert len(x) <= 3
            seen += y.tolist()
        assert sorted(seen) == list(range(10)) and seen != list(range(10))
    plain = [y.tolist() for _, y in batches(ListData(5), 2)]
    assert plain == [[0, 1], [2, 3], [4]]


def test_batches_of_a_dataset_of_three_tensors_keep_all_three() -> None:
    data = TensorDataset(torch.arange(7.0), torch.arange(7) * 2, torch.arange(7) * 3)
    got = list(batches(data, 3, torch.Generator().manual_seed(1)))
    assert [len(batch) for batch in got] == [3, 3, 3]
    for a, b, c in got:
        assert torch.equal(b, a.long() * 2) and torch.equal(c, a.long() * 3)
    assert sorted(torch.cat([a for a, _, _ in got]).tolist()) == list(range(7))


def test_generic_datasets_are_split_as_subsets() -> None:
    train, val = split_validation(ListData(10), 0.3, seed=0)
    assert len(train) == 7 and len(val) == 3
    assert as_tensors(train) is None


def test_holding_nothing_out_keeps_all_the_data_in_its_order() -> None:
    from torch.utils.data import Subset

    data = TensorDataset(torch.arange(10.0)[:, None], torch.arange(10))
    for given in (data, Subset(data, [7, 2, 5])):
        train, val = split_validation(given, 0.0, seed=3)
        expected = as_tensors(given)
        assert expected is not None and len(val) == 0 and val.tensors[0].shape == (0, 1)
        assert all(torch.equal(a, b) for a, b in zip(train.tensors, expected, strict=True))
    train, val = split_validation(ListData(4), 0.0, seed=0)  # a generic dataset: subsets
    assert [train[i][1] for i in range(len(train))] == [0, 1, 2, 3] and len(val) == 0
