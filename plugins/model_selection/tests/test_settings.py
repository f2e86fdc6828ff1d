"""``[plugins.model_selection]`` is checked when the job is loaded: every bad value stops the
job before anything trains, with a message that names the setting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flcore_model_selection import ModelSelectionHandler, ModelSelectionSettings
from flcore_model_selection.settings import looks_lower_is_better
from selection_support import digits_job

from flcore import JobError, run_job
from flcore.cli import main
from flcore.run import prepare
from flcore.settings import build_settings


def refused(
    selection: dict[str, Any],
    tmp_path: Path,
    chain: tuple[str, ...] = ("model_selection",),
    extra_plugins: dict[str, Any] | None = None,
) -> str:
    """The error a job with this section gets, and proof that nothing ran."""
    job = digits_job(chain=chain, selection=selection)
    out = tmp_path / "run"
    with pytest.raises(JobError) as caught:
        run_job(job, out=out, extra_plugins=extra_plugins)
    assert not out.exists(), "a refused job must not create its run directory"
    return str(caught.value)


def test_defaults_are_clara_s() -> None:
    s = ModelSelectionSettings()
    assert s.weigh_by_local_iter is False
    assert s.validation_metric_name == "initial_validation_metric"
    assert s.aggregation_weights == {}
    assert s.key_metric is None and s.mode is None and s.source == "clients"
    assert s.higher_is_better
    assert ModelSelectionHandler.Settings is ModelSelectionSettings


@pytest.mark.parametrize(
    "name",
    [
        "loss",
        "val_loss",
        "trainLoss",
        "initial_validation.loss",
        "error_rate",
        "MSE",
        "nll",
        "top1-err",
        "perplexity",
        "val_mae",
    ],
)
def test_lower_is_better_names(name: str) -> None:
    assert looks_lower_is_better(name)


@pytest.mark.parametrize(
    "name",
    [
        "initial_validation_metric",
        "accuracy",
        "auc",
        "f1",
        "dice",
        "initial_validation",
        "glossary_score",
    ],
)
def test_higher_is_better_names(name: str) -> None:
    assert not looks_lower_is_better(name)


@pytest.mark.parametrize(
    ("selection", "setting"),
    [
        ({"validation_metric_name": "initial_validation", "key_metric": "loss"}, "key_metric"),
        ({"validation_metric_name": "train_loss"}, "validation_metric_name"),
        ({"source": "server", "key_metric": "loss"}, "key_metric"),
    ],
)
def test_a_loss_without_mode_is_refused_before_training(
    selection: dict[str, Any], setting: str, tmp_path: Path
) -> None:
    message = refused(selection, tmp_path)
    assert "[plugins.model_selection]" in message
    assert "mode must be set explicitly" in message
    assert f"{setting} = " in message


def test_a_loss_with_an_explicit_mode_is_accepted() -> None:
    for mode in ("min", "max"):  # explicit is explicit, even when surprising
        job = digits_job(
            selection={
                "validation_metric_name": "initial_validation",
                "key_metric": "loss",
                "mode": mode,
            }
        )
        assert prepare(job).ctx.settings("model_selection").mode == mode


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        ({"mode": "best"}, "mode must be 'max' or 'min', got 'best'"),
        ({"mode": 1}, "[plugins.model_selection].mode: expected"),
        ({"modes": "max"}, "unknown key 'modes'"),
        (
            {"weigh_by_local_iter": "yes"},
            "[plugins.model_selection].weigh_by_local_iter: expected bool",
        ),
        ({"validation_metric_name": 3}, "validation_metric_name: expected"),
        ({"validation_metric_name": " "}, "validation_metric_name must name a metric, got ' '"),
        ({"key_metric": ""}, "key_metric must name a metric, got ''"),
        (
            {"aggregation_weights": {"client-0": "high"}},
            "aggregation_weights.client-0: expected float",
        ),
        ({"aggregation_weights": ["client-0"]}, "aggregation_weights: expected"),
        (
            {"aggregation_weights": {"client-0": -1.0}},
            "aggregation_weights.client-0 must be a finite number >= 0",
        ),
        (
            {"aggregation_weights": {"client-0": float("nan")}},
            "aggregation_weights.client-0: must be a finite number, got nan",
        ),
        (
            {"aggregation_weights": {"client-0": float("inf")}},
            "aggregation_weights.client-0: must be a finite number, got inf",
        ),
        ({"source": "central"}, "source: 'central' is not one of"),
        ({"source": "server"}, "key_metric must be set with source = 'server'"),
        (
            {"source": "server", "key_metric": "accuracy", "weigh_by_local_iter": True},
            "with source = 'server' there are none to weigh",
        ),
        (
            {"source": "server", "key_metric": "accuracy", "aggregation_weights": {"client-0": 2}},
            "with source = 'server' there are none to weigh",
        ),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(
    selection: dict[str, Any], expected: str, tmp_path: Path
) -> None:
    message = refused(selection, tmp_path)
    assert "selection.toml: [plugins.model_selection]" in message
    assert expected in message


def test_weights_for_a_client_the_federation_lacks_are_refused(tmp_path: Path) -> None:
    message = refused({"aggregation_weights": {"client-0": 2.0, "client-9": 1.0}}, tmp_path)
    assert "aggregation_weights: unknown client 'client-9'" in message
    assert "client-0, client-1, client-2" in message


def test_weights_may_name_a_deployment_s_allowed_clients() -> None:
    # A deployment's clients join only once the server runs; their names are the job's
    # [job] allowed_clients, which check_job sees on every runtime.
    names = ["hospital-a", "hospital-b", "hospital-c"]
    job = digits_job(
        selection={"aggregation_weights": {"hospital-a": 2}}, job={"allowed_clients": names}
    )
    training = prepare(job)
    assert training.ctx.clients == tuple(names)
    assert training.ctx.settings("model_selection").weight_of("hospital-a") == 2.0


def test_weights_for_a_name_outside_allowed_clients_are_refused(tmp_path: Path) -> None:
    names = {"allowed_clients": ["hospital-a", "hospital-b", "hospital-c"]}
    job = digits_job(selection={"aggregation_weights": {"client-0": 2}}, job=names)
    with pytest.raises(JobError) as caught:
        run_job(job, out=tmp_path / "run")
    assert "aggregation_weights: unknown client 'client-0'" in str(caught.value)
    assert "hospital-a, hospital-b, hospital-c" in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_server_source_needs_server_validation_first_in_the_chain(tmp_path: Path) -> None:
    selection = {"source": "server", "key_metric": "accuracy", "mode": "max"}
    # any plugin registered as server_validation: the check is about the chain's order
    stand_in = {"server_validation": object()}
    message = refused(selection, tmp_path, ("model_selection", "server_validation"), stand_in)
    assert "[plugins].chain: with [plugins.model_selection] source = 'server'" in message
    assert "'server_validation' must come before 'model_selection'" in message
    job = digits_job(chain=["server_validation", "model_selection"], selection=selection)
    prepare(job, extra_plugins=stand_in)  # the right order passes


def test_flcore_validate_reports_the_setting() -> None:
    runner = CliRunner()
    args = ["validate", "examples/digits/job.toml", "--set", 'plugins.chain=["model_selection"]']
    ok = runner.invoke(main, args)
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(
        main, [*args, "--set", "plugins.model_selection.validation_metric_name=val_loss"]
    )
    assert bad.exit_code == 1
    assert "mode must be set explicitly: validation_metric_name = 'val_loss'" in bad.output


def test_settings_are_checked_by_the_core_s_validator_alone() -> None:
    # what flcore does with the class, without a job: the section's types and validators
    s = build_settings(
        ModelSelectionSettings,
        {
            "aggregation_weights": {"a": 2},
            "weigh_by_local_iter": True,
            "mode": "min",
            "validation_metric_name": "initial_validation",
            "key_metric": "loss",
        },
        "[plugins.model_selection]",
    )
    assert s.aggregation_weights == {"a": 2.0} and isinstance(s.aggregation_weights["a"], float)
    assert s.weight_of("a") == 2.0 and s.weight_of("b") == 1.0
    assert not s.higher_is_better
    assert s.metric_label == "initial_validation.loss"
