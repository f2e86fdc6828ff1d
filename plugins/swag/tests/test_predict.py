"""``predict``: the Bayesian model average and its uncertainties, ``flcore.predict`` and the
``flcore predict`` command on finished runs."""

from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from flcore_swag.posterior import Posterior
from flcore_swag.predict import bayesian_model_average, entropy
from swag_helpers import ROOT, swag_job

from flcore import CodecError, HandlerFailed, load_run, load_tensors, run_job, save_tensors
from flcore import predict_run as predict
from flcore.predict import PredictError, read_inputs

FIELDS = {
    "index",
    "prediction",
    "probabilities",
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "variance",
    "std",
}


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from examples.digits import Task

    data = Task(classes=[0, 1, 2, 3, 4]).server_data()
    return data.tensors[0], data.tensors[1]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_job(swag_job(), out=tmp_path_factory.mktemp("small") / "run").run_dir


def test_the_average_is_over_probabilities_and_the_uncertainties_add_up(
    small_run: Path, digits: Any
) -> None:
    run = load_run(small_run)
    inputs = digits[0][:40]
    result = predict(run, inputs, samples=6)
    posterior = Posterior.load(small_run / "swag.safetensors")
    model = run.model
    probabilities = []
    work = copy.deepcopy(model)
    for theta in posterior.draws(6):
        posterior.load_sample(work, theta)
        with torch.no_grad():
            probabilities.append(torch.softmax(work(inputs).to(torch.float64), dim=-1))
    stacked = torch.stack(probabilities)
    torch.testing.assert_close(result["probabilities"], stacked.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        result["variance"], stacked.var(0, unbiased=False), rtol=1e-9, atol=1e-15
    )
    torch.testing.assert_close(result["std"], result["variance"].sqrt())
    torch.testing.assert_close(result["predictive_entropy"], entropy(stacked.mean(0)))
    torch.testing.assert_close(result["expected_entropy"], entropy(stacked).mean(0))
    torch.testing.assert_close(
        result["mutual_information"],
        result["predictive_entropy"] - result["expected_entropy"],
        rtol=0,
        atol=1e-12,
    )
    assert bool((result["mutual_information"] >= 0).all())
    assert result["prediction"].tolist() == stacked.mean(0).argmax(-1).tolist()
    torch.testing.assert_close(result["probabilities"].sum(-1), torch.ones(40, dtype=torch.float64))
    assert result["samples"] == 6 and "SWAG posterior (6 samples" in result["method"]
    # the caller's model is left as it was
    weights, _ = load_tensors(small_run / "global_model.safetensors")
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_one_sample_has_no_disagreement_and_scale_zero_is_the_swa_mean(
    small_run: Path, digits: Any
) -> None:
    run = load_run(small_run)
    inputs = digits[0][:20]
    one = predict(run, inputs, samples=1)
    assert float(one["mutual_information"].abs().max()) < 1e-12
    assert float(one["variance"].max()) == 0.0
    posterior = Posterior.load(small_run / "swag.safetensors")
    swa = bayesian_model_average(run.model, attrs.evolve(posterior, scale=0.0), inputs, 5)
    model = run.model
    posterior.load_sample(model, {n: v for n, v in posterior.mean.items()})
    with torch.no_grad():
        expected = torch.softmax(model(inputs).to(torch.float64), dim=-1)
    torch.testing.assert_close(swa["probabilities"], expected)
    assert float(swa["mutual_information"].max()) < 1e-12


def test_predictions_are_reproducible(small_run: Path, digits: Any) -> None:
    first = predict(load_run(small_run), digits[0][:10])
    again = predict(load_run(small_run), digits[0][:10])
    assert torch.equal(first["probabilities"], again["probabilities"])
    assert first["samples"] == 8  # the job's [plugins.swag] samples


# -- inputs ------------------------------------------------------------------------------


def test_inputs_are_read_from_npy_and_safetensors(tmp_path: Path, digits: Any) -> None:
    x = digits[0][:5]
    np.save(tmp_path / "x.npy", x.numpy())
    save_tensors(tmp_path / "one.safetensors", {"whatever": x})
    save_tensors(tmp_path / "named.safetensors", {"inputs": x, "labels": digits[1][:5]})
    for name in ("x.npy", "one.safetensors", "named.safetensors"):
        assert torch.equal(read_inputs(tmp_path / name), x)
    np.save(tmp_path / "ints.npy", (x.numpy() * 16).astype(np.int64))
    assert read_inputs(tmp_path / "ints.npy").dtype == torch.int64  # cast when predicting


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: np.save(p / "in.npy", np.zeros(64, np.float32)), "expected a batch"),
        (lambda p: np.save(p / "in.npy", np.zeros((0, 64), np.float32)), "expected a batch"),
        (
            lambda p: np.save(p / "in.npy", np.array([[1, None]], dtype=object), allow_pickle=True),
            "not a readable .npy|must be numbers",
        ),
        (lambda p: np.save(p / "in.npy", np.array([["a", "b"]])), "must be numbers"),
        (
            lambda p: np.save(p / "in.npy", np.full((3, 64), np.nan, np.float32)),
            "3 input row\\(s\\) hold NaN",
        ),
        (lambda p: (p / "in.npy").write_bytes(b"\x93NUMPY garbage"), "not a readable .npy"),
        (lambda p: (p / "in.csv").write_text("1,2\n"), "must be .npy or .safetensors"),
        (
            lambda p: save_tensors(
                p / "in.safetensors", {"a": torch.zeros(2, 64), "b": torch.zeros(2, 64)}
            ),
            "name the inputs 'inputs'",
        ),
        (
            lambda p: save_tensors(p / "in.safetensors", {"inputs": torch.zeros(2, 64) > 0}),
            "real numbers",
        ),
    ],
)
def test_bad_inputs_are_refused(tmp_path: Path, make: Any, reason: str) -> None:
    make(tmp_path)
    path = next(tmp_path.glob("in.*"))
    with pytest.raises(PredictError, match=reason):
        read_inputs(path)


def test_a_truncated_inputs_file_is_a_codec_error(tmp_path: Path) -> None:
    save_tensors(tmp_path / "in.safetensors", {"inputs": torch.zeros(4, 64)})
    data = (tmp_path / "in.safetensors").read_bytes()
    (tmp_path / "in.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CodecError, match="truncated"):
        read_inputs(tmp_path / "in.safetensors")


def test_inputs_of_the_wrong_shape_are_refused(small_run: Path) -> None:
    run = load_run(small_run)
    with pytest.raises(PredictError, match=r"inputs of shape \(3, 63\) do not fit the model"):
        predict(run, torch.zeros(3, 63))
    with pytest.raises(PredictError, match=r"inputs of shape \(3, 8, 8\) do not fit"):
        predict(run, torch.zeros(3, 8, 8))


# -- runs without a posterior, and broken ones --------------------------------------------


def test_a_run_without_swag_predicts_with_its_global_model(tmp_path: Path, digits: Any) -> None:
    result = run_job(swag_job(chain=[]), out=tmp_path / "run")
    out = predict(load_run(result.run_dir), digits[0][:7])
    assert out["method"] == "global model (no posterior)"
    assert out["probabilities"].shape == (7, 10)


def test_a_swag_run_without_its_posterior_falls_back_and_says_so(
    small_run: Path, tmp_path: Path, digits: Any
) -> None:
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    for name in ("job.toml", "global_model.safetensors"):
        (copy_dir / name).write_bytes((small_run / name).read_bytes())
    out = predict(load_run(copy_dir), digits[0][:7])
    assert out["method"] == "global model (no posterior)"


def test_a_truncated_posterior_is_an_error_not_a_fallback(small_run: Path, tmp_path: Path) -> None:
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    for name in ("job.toml", "global_model.safetensors", "swag.safetensors"):
        (copy_dir / name).write_bytes((small_run / name).read_bytes())
    data = (copy_dir / "swag.safetensors").read_bytes()
    (copy_dir / "swag.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(HandlerFailed, match=r"swag\.safetensors: malformed or truncated"):
        predict(load_run(copy_dir), torch.zeros(2, 64))


def test_a_directory_that_is_no_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PredictError, match="not a run directory"):
        load_run(tmp_path)


# -- the command ----------------------------------------------------------------------------


def _flcore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flcore", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_flcore_predict_writes_one_row_per_input(
    example_run: Any, tmp_path: Path, digits: Any
) -> None:
    inputs = tmp_path / "inputs.npy"
    np.save(inputs, digits[0][:25].numpy())
    out = tmp_path / "predictions.jsonl"
    done = _flcore("predict", str(example_run.run_dir), str(inputs), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "predicted 25 inputs with SWAG posterior (30 samples" in done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 25 and [r["index"] for r in rows] == list(range(25))
    for row in rows:
        assert set(row) == FIELDS
        assert len(row["probabilities"]) == len(row["variance"]) == len(row["std"]) == 10
        assert abs(sum(row["probabilities"]) - 1) < 1e-9
        assert row["mutual_information"] >= 0
        assert row["prediction"] == int(np.argmax(row["probabilities"]))
    correct = sum(r["prediction"] == int(t) for r, t in zip(rows, digits[1][:25], strict=True))
    assert correct >= 23


def test_flcore_predict_writes_csv_and_honours_samples(
    example_run: Any, tmp_path: Path, digits: Any
) -> None:
    inputs = tmp_path / "inputs.safetensors"
    save_tensors(inputs, {"inputs": digits[0][:9]})
    out = tmp_path / "predictions.csv"
    done = _flcore(
        "predict", str(example_run.run_dir), str(inputs), "--samples", "5", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert "(5 samples" in done.stderr
    with open(out, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 9
    assert {
        "prediction",
        "predictive_entropy",
        "mutual_information",
        "probabilities_0",
        "probabilities_9",
        "variance_9",
        "std_0",
        "expected_entropy",
    } <= set(table[0])


def test_flcore_predict_prints_json_lines_and_says_when_there_is_no_posterior(
    tmp_path: Path, digits: Any
) -> None:
    result = run_job(swag_job(chain=[]), out=tmp_path / "run")
    inputs = tmp_path / "inputs.npy"
    np.save(inputs, digits[0][:3].numpy())
    done = _flcore("predict", str(result.run_dir), str(inputs))
    assert done.returncode == 0, done.stderr
    assert "with global model (no posterior)" in done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == 3 and "predictive_entropy" in rows[0]


def test_flcore_predict_refuses_bad_input_with_a_message(example_run: Any, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs.npy"
    np.save(inputs, np.zeros((4, 10), np.float32))
    done = _flcore("predict", str(example_run.run_dir), str(inputs))
    assert done.returncode == 1
    assert "error: inputs of shape (4, 10) do not fit the model" in done.stderr
    done = _flcore("predict", str(example_run.run_dir), str(inputs), "--out", "x.txt")
    assert done.returncode == 1 and "write .jsonl (JSON lines) or .csv" in done.stderr
    done = _flcore("predict", str(example_run.run_dir), str(inputs), "--samples", "0")
    assert done.returncode == 2 and "--samples" in done.stderr
