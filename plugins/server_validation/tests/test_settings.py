"""``[plugins.server_validation]`` is checked before anything trains."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from flcore_server_validation import ServerValidationSettings
from server_validation_helpers import digits_job

from flcore import JobError, run_job


def test_defaults_are_clara_s() -> None:
    settings = ServerValidationSettings()
    assert settings.evaluator is None  # the chain's evaluate hook
    assert settings.num_rounds_per_valid == 1


@pytest.mark.parametrize("every", [0, -3])
def test_num_rounds_per_valid_below_one_is_refused_before_training(
    tmp_path: Path, every: int
) -> None:
    with pytest.raises(JobError) as raised:
        run_job(digits_job(every=every), out=tmp_path / "run")
    message = str(raised.value)
    assert "[plugins.server_validation]" in message
    assert "num_rounds_per_valid must be at least 1" in message
    assert f"got {every}" in message
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (
            "num_rounds_per_valid",
            "3",
            "[plugins.server_validation].num_rounds_per_valid: expected int",
        ),
        (
            "num_rounds_per_valid",
            2.5,
            "[plugins.server_validation].num_rounds_per_valid: expected int",
        ),
        ("evaluator", 7, "[plugins.server_validation].evaluator: expected"),
        ("every", 3, "[plugins.server_validation]: unknown key 'every'"),
    ],
)
def test_a_wrong_key_or_type_is_named(
    tmp_path: Path, key: str, value: object, expected: str
) -> None:
    job = digits_job(plugins={"server_validation": {key: value}})
    with pytest.raises(JobError, match=re.escape(expected)):
        run_job(job, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
