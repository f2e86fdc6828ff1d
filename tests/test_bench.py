"""The benchmark runner's own logic (the figures themselves are measured on demand)."""

from __future__ import annotations

import math
import subprocess
import sys

import torch

from bench.cases import Row, interleaved
from tests.conftest import ROOT


def test_baseline_and_flcore_alternate_and_report_wall_and_cpu_medians() -> None:
    calls: list[str] = []

    def spin(label: str) -> str:
        calls.append(label)
        total = 0
        for i in range(200_000):  # some CPU time, so that the CPU figure is not zero
            total += i
        return label

    (base_wall, base_cpu, base), (ours_wall, ours_cpu, ours) = interleaved(
        lambda: spin("base"), lambda: spin("ours"), 3
    )
    assert calls == ["base", "ours"] * 3
    assert (base, ours) == ("base", "ours")
    assert base_wall > 0 and ours_wall > 0 and base_cpu > 0 and ours_cpu > 0
    calls.clear()
    three = interleaved(lambda: spin("base"), lambda: spin("ours"), 2, lambda: spin("best"))
    assert calls == ["base", "ours", "best"] * 2
    assert [result for _, _, result in three] == ["base", "ours", "best"]


def test_a_row_prints_both_figures_and_their_ratio() -> None:
    row = Row("A", "what", 3.0, 2.0, "s", "<= 1.15")
    assert row.ratio == 1.5
    assert "1.500" in row.format() and "<= 1.15" in row.format()


def test_an_unknown_case_is_refused_by_name() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "Z"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "unknown case(s) ['Z']" in done.stderr


def test_the_bare_loop_over_all_indices_is_the_bare_loop() -> None:
    from bench.baseline import bare_fedavg
    from examples.digits import Task

    task = Task(hidden=8)
    whole = bare_fedavg(task, 4, 2, 1, 32, 0.05, 0)
    listed = bare_fedavg(task, 4, 2, 1, 32, 0.05, 0, indices=[0, 1, 2, 3])
    share = bare_fedavg(task, 4, 2, 1, 32, 0.05, 0, indices=[1, 3])
    assert all(torch.equal(whole[k], listed[k]) for k in whole)
    assert not all(torch.equal(whole[k], share[k]) for k in whole)


def test_side_by_side_times_the_slowest_of_processes_started_together() -> None:
    from bench.cases import side_by_side

    seconds = side_by_side(hidden=8, clients=4, rounds=1, processes=2, repeat=2)
    assert 0 < seconds < math.inf  # a measurement; how long is bench's to say


def test_the_bare_loop_parallelised_by_hand_gives_its_weights_bit_for_bit() -> None:
    from bench.baseline import ParallelBareLoop, bare_fedavg
    from examples.digits import Task
    from flcore.data import seed_torch

    task = Task(hidden=8)
    single = bare_fedavg(task, 5, 3, 1, 32, 0.05, 0)
    for processes in (2, 3):  # 3 deals the clients unevenly
        loop = ParallelBareLoop(task, 5, 3, 1, 32, 0.05, 0, processes)
        try:
            runs = [loop.run(), loop.run()]  # a second run starts again from the initial model
        finally:
            loop.close()
        for seconds, parallel in runs:
            assert 0 < seconds < math.inf  # a measurement; how long is bench's to say
            assert parallel.keys() == single.keys()
            assert all(torch.equal(parallel[k], single[k]) for k in single)
    seed_torch(0)
    initial = task.model().state_dict()
    assert not any(torch.equal(initial[k], single[k]) for k in single)  # it did train
