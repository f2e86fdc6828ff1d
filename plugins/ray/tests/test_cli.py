"""``flcore run job.toml`` on Ray from the command line: the plugin starts a local Ray
instance itself, trains, shuts it down, and the weights are the embedded runtime's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ray_helpers import ROOT

from flcore import Job, run_job

JOB = """
[job]
name = "cli-ray"
task = "examples.digits"
rounds = 2
clients = 10
runtime = "ray"

[task]
hidden = 8

[plugins]
chain = ["ray"]

[plugins.ray]
cpus_per_client = 1
"""


def test_flcore_run_on_ray_starts_and_stops_its_own_ray(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(JOB)
    done = subprocess.run(
        [sys.executable, "-m", "flcore", "run", str(path), "--out", str(tmp_path / "ray")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = [json.loads(line) for line in (tmp_path / "ray" / "metrics.jsonl").open()]
    assert [len(r["clients"]) for r in rounds] == [10, 10]
    embedded = run_job(
        Job.load(path, ["job.runtime=embedded", "plugins.chain=[]"]), out=tmp_path / "embedded"
    )
    ray_model = (tmp_path / "ray" / "global_model.safetensors").read_bytes()
    assert ray_model == embedded.global_model_path.read_bytes()
