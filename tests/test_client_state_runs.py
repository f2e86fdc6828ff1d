"""Per-client state (``ClientContext.state``) through real runs: it lasts across rounds for
each client, is the same on every runtime, and survives a SIGKILL and ``--resume``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from flcore import hookimpl, saved_state
from flcore.run import run_job
from tests.conftest import flcore_in, small_job
from tests.fixtures.test_plugins.flcore_test_plugins.algorithms import RoundCounter


def client_counts(run_dir: Path) -> dict[str, tuple[int, list[float]]]:
    """Each client's newest saved state: (rounds it trained in, the rounds' numbers)."""
    counts = {}
    for folder in sorted((run_dir / "clients").iterdir()):
        newest = max(folder.glob("state-*.safetensors"))
        value, _ = saved_state.load(newest)
        counts[folder.name] = (value["rounds"], value["trace"].tolist())
    return counts


def cohorts(run_dir: Path) -> list[list[str]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["cohort"] for line in lines]


def test_each_client_keeps_its_own_count_across_rounds(tmp_path: Path) -> None:
    job = small_job(["counter"], job={"clients": 4, "clients_per_round": 2, "rounds": 4})
    result = run_job(job, out=tmp_path / "run", extra_plugins={"counter": RoundCounter})
    expected: dict[str, list[float]] = {}
    for round_, cohort in enumerate(cohorts(result.run_dir), start=1):
        for name in cohort:
            expected.setdefault(name, []).append(float(round_))
    assert client_counts(result.run_dir) == {n: (len(r), r) for n, r in expected.items()}


def test_client_plugins_are_instances_of_their_own(tmp_path: Path) -> None:
    seen: dict[str, set[int]] = {"server": set(), "client": set()}

    class Where:
        @hookimpl
        def start_round(self, ctx: Any) -> None:
            seen["server"].add(id(self))

        @hookimpl
        def receive_model(self, ctx: Any) -> None:
            seen["client"].add(id(self))

    run_job(small_job(["where"]), out=tmp_path / "run", extra_plugins={"where": Where})
    assert len(seen["server"]) == 1 and len(seen["client"]) == 1
    assert seen["server"] != seen["client"]


def job_file(tmp_path: Path, workers: int) -> Path:
    path = tmp_path / f"job-{workers}.toml"
    path.write_text(
        f"""
[job]
name = "counting"
task = "examples.digits"
rounds = 4
clients = 4
clients_per_round = 2
workers = {workers}

[task]
hidden = 8

[plugins]
chain = ["round_counter", "kill_server"]
"""
    )
    return path


def flcore_run(python: Path, *args: str, kill: bool = False) -> subprocess.CompletedProcess[str]:
    """``flcore run ARGS``; ``kill``: the kill_server plugin SIGKILLs the run."""
    return flcore_in(python, "run", *args, env={"FLCORE_TEST_KILL": "1"} if kill else None)


def test_per_client_state_is_the_same_on_every_runtime_and_survives_sigkill(
    plugin_env_python: Path, tmp_path: Path
) -> None:
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"whole-{workers}"
        done = flcore_run(plugin_env_python, str(job_file(tmp_path, workers)), "--out", str(out))
        assert done.returncode == 0, done.stderr
        runs[workers] = out
    assert client_counts(runs[0]) == client_counts(runs[2])
    whole = (runs[0] / "global_model.safetensors").read_bytes()
    assert (runs[2] / "global_model.safetensors").read_bytes() == whole

    cut = tmp_path / "cut"
    killed = flcore_run(plugin_env_python, str(job_file(tmp_path, 0)), "--out", str(cut), kill=True)
    assert killed.returncode == -9, killed.stderr  # SIGKILL as round 3 starts
    resumed = flcore_run(plugin_env_python, "--resume", str(cut))
    assert resumed.returncode == 0, resumed.stderr
    assert (cut / "global_model.safetensors").read_bytes() == whole
    assert client_counts(cut) == client_counts(runs[0])


def test_a_deployed_client_keeps_its_state_on_its_own_disk(
    plugin_env_python: Path, tmp_path: Path
) -> None:
    from tests.deploy_support import deployment_in

    names = ("hospital-a", "hospital-b", "hospital-c")
    job = tmp_path / "job.toml"
    job.write_text(
        f"""
[job]
name = "counting"
task = "examples.digits"
rounds = 3
clients = 3
clients_per_round = 2
allowed_clients = {json.dumps(list(names))}
heartbeat_interval = 2.0

[task]
hidden = 8

[plugins]
chain = ["round_counter"]
"""
    )
    simulated = tmp_path / "simulated"
    done = flcore_run(plugin_env_python, str(job), "--out", str(simulated))
    assert done.returncode == 0, done.stderr
    with deployment_in(tmp_path / "deploy", plugin_env_python) as dep:
        (tmp_path / "deploy").mkdir()
        dep.certs(clients=names)
        run = tmp_path / "deploy" / "run"
        server, address = dep.server(job, run)
        state = tmp_path / "deploy" / "state"
        clients = [dep.client(address, n, job, "--state-dir", str(state)) for n in names]
        assert dep.wait(server) == 0, dep.log(server)
        for client in clients:
            assert dep.wait(client) == 0, dep.log(client)
    assert (run / "global_model.safetensors").read_bytes() == (
        simulated / "global_model.safetensors"
    ).read_bytes()
    deployed = {}
    for name in names:
        if not (state / name).exists():  # in no round's cohort
            continue
        folders = list((state / name).iterdir())  # one folder: this server run's
        assert [f.name for f in folders] == [run.name]
        newest = max(folders[0].glob("state-*.safetensors"))
        value, _ = saved_state.load(newest)
        deployed[name] = (value["rounds"], value["trace"].tolist())
    assert deployed == client_counts(simulated)
