"""The benchmark runner's own logic (the figures themselves are measured on demand)."""

from __future__ import annotations

import subprocess
import sys

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
