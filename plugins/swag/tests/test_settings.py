"""``[plugins.swag]`` is checked by the core before anything trains; every error names its key."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from flcore_swag import Settings
from swag_helpers import EXAMPLE_JOB, swag_job

from flcore import FLCoreError, JobError
from flcore.run import prepare


def test_defaults_follow_the_paper() -> None:
    settings = Settings()
    assert (settings.rank, settings.samples, settings.scale) == (20, 30, 0.5)
    assert settings.rounds == 1 and settings.bn_update and settings.weight_by == "samples"
    assert settings.snapshot_every is None  # one snapshot per epoch


def test_the_example_job_is_valid() -> None:
    training = prepare(swag_job().__class__.load(EXAMPLE_JOB))
    assert training.ctx.settings("swag") == Settings(
        rounds=1, epochs=20, lr=0.05, rank=20, samples=30, scale=0.5
    )


@pytest.mark.parametrize(
    ("values", "key", "message"),
    [
        ({"rank": 1}, "rank", r"0 \(SWAG-Diag\) or at least 2"),
        ({"rank": -3}, "rank", r"0 \(SWAG-Diag\) or at least 2"),
        ({"rank": "20"}, "rank", "expected int"),
        ({"scale": -0.5}, "scale", "at least 0.0"),
        ({"samples": 0}, "samples", "at least 1"),
        ({"epochs": 0}, "epochs", "at least 1"),
        ({"steps": 0}, "steps", "at least 1"),
        ({"rounds": 0}, "rounds", "at least 1"),
        ({"lr": 0.0}, "lr", "positive"),
        ({"var_clamp": -1e-9}, "var_clamp", "at least 0.0"),
        ({"bn_update": 1}, "bn_update", "expected bool"),
        ({"weight_by": "clients"}, "weight_by", "not one of"),
        ({"steps": 3, "snapshot_every": 5}, "snapshot_every", "no snapshot would be taken"),
        ({"sample": 30}, "sample", "unknown key 'sample'"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(
    values: dict[str, Any], key: str, message: str
) -> None:
    job = swag_job(swag=values)
    with pytest.raises(JobError, match=message) as err:
        prepare(job)
    assert "plugins.swag" in str(err.value) and key in str(err.value)


def test_a_zero_learning_rate_is_refused_before_training() -> None:
    job = swag_job(local={"lr": 0.0})
    # check_job's JobError reaches the user through the chain, naming the plugin and the key
    with pytest.raises(FLCoreError, match=r"plugins\.swag\]\.lr: SWAG collects at a constant"):
        prepare(job)
    prepare(swag_job(local={"lr": 0.0}, swag={"lr": 0.01}))  # its own rate makes it fine


def test_flcore_validate_names_the_bad_key(tmp_path: Any) -> None:
    job = tmp_path / "job.toml"
    job.write_text(EXAMPLE_JOB.read_text().replace("rank = 20", "rank = 1"))
    result = subprocess.run(
        [sys.executable, "-m", "flcore", "validate", str(job)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "[plugins.swag]: rank must be 0 (SWAG-Diag) or at least 2, got 1" in result.stderr
