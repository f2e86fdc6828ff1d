from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from flcore import saved_state
from flcore.client_state import ClientStateStore
from flcore.errors import CodecError


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def loaded(store: ClientStateStore, before_round: int) -> dict[str, Any]:
    value = store.load(before_round)
    assert isinstance(value, dict)
    return value


def test_load_without_any_state_is_none(tmp_path: Path) -> None:
    assert ClientStateStore(tmp_path / "missing").load(5) is None
    assert not (tmp_path / "missing").exists()
    assert ClientStateStore(tmp_path).load(5) is None


def test_the_directory_is_made_by_the_first_save(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path / "client-3" / "state")
    store.save(0, {"c": torch.ones(2)})
    assert files(tmp_path / "client-3" / "state") == ["state-000000.safetensors"]


def test_load_gives_the_newest_state_before_the_round(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    for r in (1, 2, 4):  # the client took no part in round 3
        store.save(r, {"round": r, "c": torch.full((2,), float(r))})
    assert store.load(0) is None
    assert loaded(store, 3)["round"] == 2
    assert loaded(store, 4)["round"] == 2
    got = loaded(store, 5)
    assert got["round"] == 4 and torch.equal(got["c"], torch.full((2,), 4.0))
    assert loaded(store, 99)["round"] == 4


def test_state_of_a_round_never_committed_is_ignored(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    store.save(3, "committed")
    store.save(4, "killed before the server committed round 4")
    assert store.load(4) == "committed"
    store.save(4, "round 4 again")  # the resumed run repeats it
    assert store.load(5) == "round 4 again"


def test_foreign_files_are_ignored(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    store.save(1, "one")
    for name in (
        "state-2.safetensors",
        "state-0000002.safetensors",
        "state-000002.safetensors.bak",
        ".state-000002.safetensors.x1y2.tmp",
        "notes.txt",
    ):
        (tmp_path / name).write_bytes(b"garbage")
    (tmp_path / "state-000003.safetensors.d").mkdir()
    assert store.load(10) == "one"
    store.save(5, "five")  # pruning leaves them alone too
    assert "notes.txt" in files(tmp_path) and "state-2.safetensors" in files(tmp_path)


def test_pruning_keeps_what_a_resume_two_rounds_back_needs(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    for r in range(6):
        store.save(r, r)
    # round 5's request may have come when only round 3 was committed: a resume then
    # starts at round 4 and reads the state of round 3
    assert files(tmp_path) == [f"state-{r:06d}.safetensors" for r in (3, 4, 5)]
    for resume in (4, 5, 6):
        assert store.load(resume) == resume - 1


def test_pruning_keeps_the_newest_state_at_or_before_two_rounds_back(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    for r in (0, 2, 3, 7):  # a client chosen only in some rounds
        store.save(r, r)
    # the server may have committed only round 5: a resume at round 6 needs round 3's state
    assert files(tmp_path) == ["state-000003.safetensors", "state-000007.safetensors"]
    assert store.load(6) == 3
    store.save(9, 9)
    assert files(tmp_path) == [f"state-{r:06d}.safetensors" for r in (7, 9)]
    assert store.load(8) == 7


def test_early_rounds_prune_nothing(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    store.save(0, 0)
    store.save(1, 1)
    assert len(files(tmp_path)) == 2


def test_a_resumed_save_of_an_earlier_round_keeps_later_files(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    for r in range(5):
        store.save(r, f"first {r}")
    store.save(3, "again 3")  # resumed from round 2: round 4's file is stale, never read
    assert files(tmp_path) == [f"state-{r:06d}.safetensors" for r in (2, 3, 4)]
    assert store.load(4) == "again 3"


def test_state_round_trips_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    control = torch.randn(3, 4, dtype=torch.float64)
    store = ClientStateStore(tmp_path)
    store.save(2, {"control": control, "steps": [1, 2], "m": None})
    got = loaded(store, 3)
    assert got["steps"] == [1, 2] and got["m"] is None
    assert torch.equal(got["control"], control)
    assert got["control"].dtype == torch.float64


def test_a_corrupt_chosen_file_is_named(tmp_path: Path) -> None:
    store = ClientStateStore(tmp_path)
    store.save(1, "one")
    store.save(2, "two")
    path = tmp_path / "state-000002.safetensors"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CodecError, match=re.escape(str(path))):
        store.load(3)
    assert store.load(2) == "one"  # an older round does not read it


def test_a_file_renamed_to_another_round_is_refused(tmp_path: Path) -> None:
    saved_state.save(tmp_path / "state-000004.safetensors", "x", {"round": 2})
    with pytest.raises(CodecError, match=r"state-000004\.safetensors.*not round 4"):
        ClientStateStore(tmp_path).load(5)


def test_a_negative_round_is_a_caller_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="round must be >= 0"):
        ClientStateStore(tmp_path).save(-1, 0)
