"""A sampled cohort and per-client state on Ray: the same cohorts, counts and final bytes as
the embedded runtime. The counting plugin is a real distribution (an entry point in a
``dist-info`` folder) on the path of this process and of every Ray worker, as an installed
third-party plugin would be."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_helpers import ROOT, TESTS, ray_job

from flcore import run_job

COUNTER = '''
import torch
from flcore import hookimpl


class RoundCounter:
    """Counts in per-client state the rounds a client trained in; the count nudges the update."""

    @hookimpl
    def send_update(self, ctx, weights):
        count = int(ctx.state.get("rounds", 0)) + 1
        ctx.state["rounds"] = count
        ctx.state["trace"] = torch.cat(
            [ctx.state.get("trace", torch.zeros(0)), torch.tensor([float(ctx.round)])]
        )
        first = sorted(weights)[0]
        weights[first] = weights[first] + 1e-3 * count
'''


@pytest.fixture(scope="module")
def counter_installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The ``ray_counter`` plugin installed on this process's path and on Ray's workers'."""
    import ray

    folder = tmp_path_factory.mktemp("site")
    (folder / "flcore_ray_counter.py").write_text(COUNTER)
    info = folder / "flcore_ray_counter-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: flcore-ray-counter\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(
        "[flcore.plugins]\nray_counter = flcore_ray_counter:RoundCounter\n"
    )
    sys.path.insert(0, str(folder))
    before = Path.cwd()
    os.chdir(ROOT)
    try:
        paths = os.pathsep.join([str(ROOT), str(TESTS), str(folder)])
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": paths}},
        )
        yield
    finally:
        ray.shutdown()
        os.chdir(before)
        sys.path.remove(str(folder))


def cohorts(run_dir: Path) -> list[list[str]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["cohort"] for line in lines]


def client_states(run_dir: Path) -> dict[str, tuple[int, list[float]]]:
    """Each client's newest saved state, read as flcore reads it back on a resume."""
    from flcore.saved_state import load  # the core's reader: this test checks what it wrote

    found = {}
    for folder in sorted((run_dir / "clients").iterdir()):
        state, _ = load(max(folder.glob("state-*.safetensors")))
        found[folder.name] = (state["rounds"], state["trace"].tolist())
    return found


def test_a_cohort_and_per_client_state_match_the_embedded_runtime(
    counter_installed: None, tmp_path: Path
) -> None:
    sampled = {"clients": 10, "clients_per_round": 3, "rounds": 3}
    embedded = run_job(
        ray_job(["ray_counter"], job={**sampled, "runtime": "embedded"}),
        out=tmp_path / "embedded",
    )
    on_ray = run_job(ray_job(["ray", "ray_counter"], job=sampled), out=tmp_path / "ray")
    assert cohorts(on_ray.run_dir) == cohorts(embedded.run_dir)
    assert all(len(c) == 3 for c in cohorts(on_ray.run_dir))
    assert on_ray.global_model_path.read_bytes() == embedded.global_model_path.read_bytes()
    assert client_states(on_ray.run_dir) == client_states(embedded.run_dir)
    assert client_states(on_ray.run_dir)  # some client counted
