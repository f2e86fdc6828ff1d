"""The three plugins of this repo composed in one job, run through the CLI as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flcore import codec
from tests.conftest import ROOT

pytest.importorskip("flcore_swag")
pytest.importorskip("flcore_model_selection")
pytest.importorskip("flcore_server_validation")

JOB = """
[job]
name = "stack"
task = "examples.digits"
rounds = 4
clients = 3
seed = 0
keep_round_models = true

[task]
classes = [0, 1, 2, 3, 4]
hidden = 16

[local]
epochs = 1
lr = 0.1
momentum = 0.9

[plugins]
chain = ["server_validation", "model_selection", "swag"]

[plugins.server_validation]
num_rounds_per_valid = 2

[plugins.model_selection]
source = "server"
key_metric = "accuracy"
mode = "max"

[plugins.swag]
epochs = 3
rank = 3
samples = 4
"""


def flcore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flcore", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("stack")
    (tmp / "job.toml").write_text(JOB)
    result = flcore("run", str(tmp / "job.toml"), "--out", str(tmp / "run"))
    assert result.returncode == 0, result.stderr
    return tmp / "run"


def test_server_validation_feeds_model_selection(run_dir: Path) -> None:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    training = [x for x in lines if "server" in x]
    assert [x["round"] for x in training] == [2, 4]  # every 2nd round and the last
    best = max(training, key=lambda x: x["server"]["accuracy"])
    chosen = json.loads((run_dir / "best_model.json").read_text())
    assert chosen["round"] == best["round"]
    saved = run_dir / "rounds" / f"{best['round']:04d}" / "global_model.safetensors"
    ours, _ = codec.load_file(run_dir / "best_model.safetensors")
    theirs, _ = codec.load_file(saved)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_swag_adds_a_posterior_and_predict_uses_it(run_dir: Path, tmp_path: Path) -> None:
    assert (run_dir / "swag.safetensors").exists() and (run_dir / "swag.json").exists()
    inputs = tmp_path / "inputs.npy"
    np.save(inputs, np.random.default_rng(0).random((5, 64), dtype=np.float32))
    out = tmp_path / "predictions.jsonl"
    result = flcore("predict", str(run_dir), str(inputs), "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 5
    assert {"prediction", "predictive_entropy", "mutual_information"} <= set(rows[0])


def test_a_custom_stack_composes_in_one_chain(tmp_path: Path) -> None:
    """A sampled cohort, FedProx and a clip on the clients, an update filter out of each
    client and into the server, FedAvgM on the server and model selection: one chain, each
    part visibly at work."""
    from typing import Any

    from flcore import hookimpl, run_job
    from tests.conftest import small_job
    from tests.fixtures.test_plugins.flcore_test_plugins.algorithms import (
        ClipAfterStep,
        Proximal,
        ServerMomentum,
    )

    seen: dict[str, int] = {"sent": 0, "received": 0}

    class Noise:
        @hookimpl
        def send_update(self, ctx: Any, weights: dict[str, Any]) -> None:
            seen["sent"] += 1
            for name, w in weights.items():
                if w.is_floating_point():
                    weights[name] = w + 1e-4 * torch.randn_like(w)

    class Bound:
        @hookimpl
        def receive_contribution(self, ctx: Any, contribution: Any) -> None:
            seen["received"] += 1
            for name, w in contribution.weights.items():
                contribution.weights[name] = w.clamp(-0.2, 0.2)

    chain = ["proximal", "clip", "noise", "bound", "momentum", "model_selection"]
    job = small_job(
        chain,
        job={"clients": 6, "clients_per_round": 3, "rounds": 3},
        **{
            "plugins.proximal": {"mu": 0.01},
            "plugins.clip": {"bound": 0.3},
            "plugins.momentum": {"beta": 0.5},
        },
    )
    plugins = {
        "proximal": Proximal,
        "clip": ClipAfterStep,
        "noise": Noise,
        "bound": Bound,
        "momentum": ServerMomentum,
    }
    result = run_job(job, out=tmp_path / "run", extra_plugins=plugins)
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [len(line["cohort"]) for line in lines] == [3, 3, 3]
    assert seen == {"sent": 9, "received": 9}  # three clients a round, both filters
    assert (result.run_dir / "best_model.safetensors").exists()
    _, meta = codec.load_file(result.global_model_path)
    assert set(meta["state"]) == {"momentum", "model_selection"}
    assert meta["state_tensors"] == "plugin_state/0003.safetensors"
