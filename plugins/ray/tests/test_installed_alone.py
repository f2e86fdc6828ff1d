"""``pip install ./plugins/ray`` beside the core, with no other plugin: it is listed with its
hooks, importing it loads neither ray nor torch, and a job runs on Ray from the command line."""

from __future__ import annotations

import json
from pathlib import Path

from ray_helpers import ROOT, TESTS

from flcore.testing import install_alone

JOB = """
[job]
name = "alone"
task = "examples.digits"
rounds = 1
clients = 4
runtime = "ray"

[task]
hidden = 8

[plugins]
chain = ["ray"]
"""


def test_installed_alone_it_is_listed_and_runs_a_job(tmp_path: Path) -> None:
    alone = install_alone(TESTS.parent, "flcore-ray", tmp_path, cwd=ROOT)
    run, env_dir = alone.run, alone.root

    probe = run(
        "-c",
        "import json, sys, flcore_ray; print(json.dumps({'file': flcore_ray.__file__, "
        "'loaded': [m for m in ('ray', 'torch') if m in sys.modules]}))",
    )
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert Path(found["file"]).is_relative_to(env_dir)  # the installed copy, not the source
    assert found["loaded"] == []

    listed = run("-m", "flcore", "plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    plugins = {p["name"]: p for p in json.loads(listed.stdout) if not p["builtin"]}
    assert set(plugins) == {"ray"}
    info = plugins["ray"]
    assert info["distribution"] == "flcore-ray" and info["error"] is None
    assert info["target"] == "flcore_ray:RayPlugin"
    assert {"check_job", "get_runtime", "startup"} <= set(info["hooks"])

    job = tmp_path / "job.toml"
    job.write_text(JOB)
    done = run("-m", "flcore", "run", str(job), "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert rounds[0]["clients"] == [f"client-{i}" for i in range(4)]
