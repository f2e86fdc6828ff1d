"""``flcore predict`` as functions: load a finished run, read inputs, ask the chain's
``predict``, and write one row per input (JSON lines or CSV).

The run's own ``job.toml`` rebuilds its chain, so the uncertainty method the run was trained
with (SWAG, when ``swag`` is in the chain and left its posterior) answers; without one the
core predicts with the global model, and its ``method`` says so.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from flcore import codec
from flcore.chain import Chain
from flcore.context import ServerContext
from flcore.errors import FLCoreError
from flcore.job import Job
from flcore.logging import make_logger
from flcore.task import load_task
from flcore.training import GLOBAL_MODEL

INPUT_FORMATS = (".npy", ".safetensors")


class PredictError(FLCoreError):
    """The run, the inputs or the output cannot be used; the message says which and why."""


@attrs.frozen
class LoadedRun:
    """A finished run, ready to predict: its job, chain (in ``ctx``) and global model."""

    run_dir: Path
    job: Job
    ctx: ServerContext
    model: torch.nn.Module


def load_run(run_dir: str | Path, log: Any = None) -> LoadedRun:
    """Rebuild a run's chain and task from its ``job.toml`` and load its global model."""
    run_dir = Path(run_dir)
    job_file = run_dir / "job.toml"
    if not job_file.is_file():
        raise PredictError(f"{str(run_dir)!r} is not a run directory (no job.toml)")
    job = Job.load(job_file)
    chain = Chain.for_job(job)
    task = load_task(job)
    model = task.model()
    weights, _ = codec.load_file(run_dir / GLOBAL_MODEL)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise PredictError(
            f"{run_dir / GLOBAL_MODEL}: does not fit the task's model: {err}"
        ) from err
    model.eval()
    ctx = ServerContext(
        job=job,
        task=task,
        chain=chain,
        log=log or make_logger(None),
        run_dir=run_dir.resolve(),
        clients=job.client_names,
    )
    return LoadedRun(run_dir, job, ctx, model)


def read_inputs(path: str | Path) -> torch.Tensor:
    """The inputs in a ``.npy`` file (no pickles) or a ``.safetensors`` file (its one tensor,
    or the one named ``inputs``): a batch with one input per row along the first axis."""
    path = Path(path)
    if path.suffix not in INPUT_FORMATS:
        raise PredictError(f"{str(path)!r}: inputs must be {' or '.join(INPUT_FORMATS)}")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise PredictError(f"{str(path)!r}: not a readable .npy array: {err}") from err
        if array.dtype.kind not in "biuf":
            raise PredictError(f"{str(path)!r}: inputs must be numbers, not dtype {array.dtype}")
        inputs = torch.from_numpy(np.ascontiguousarray(array))
    else:
        tensors, _ = codec.load_file(path)
        if "inputs" in tensors:
            inputs = tensors["inputs"]
        elif len(tensors) == 1:
            inputs = next(iter(tensors.values()))
        else:
            raise PredictError(
                f"{str(path)!r}: holds {len(tensors)} tensors; name the inputs 'inputs'"
            )
        if inputs.dtype == torch.bool or inputs.is_complex():
            raise PredictError(f"{str(path)!r}: inputs must be real numbers, not {inputs.dtype}")
    if inputs.dim() < 2 or inputs.shape[0] == 0:
        raise PredictError(
            f"{str(path)!r}: expected a batch of shape (N, ...) with one input per row, "
            f"got shape {tuple(inputs.shape)}"
        )
    if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        bad = int((~torch.isfinite(inputs)).any(dim=tuple(range(1, inputs.dim()))).sum())
        raise PredictError(f"{str(path)!r}: {bad} input row(s) hold NaN or infinite values")
    return inputs


def predict(run: LoadedRun, inputs: torch.Tensor, samples: int | None = None) -> dict[str, Any]:
    """Ask the run's chain to predict ``inputs``; checks that they fit the model first."""
    params = list(run.model.parameters())
    inputs = inputs.to(params[0].dtype if params else torch.get_default_dtype())
    try:
        with torch.no_grad():
            probe = run.model(inputs[:1])
    except (RuntimeError, ValueError, IndexError) as err:
        raise PredictError(
            f"inputs of shape {tuple(inputs.shape)} do not fit the model: {err}"
        ) from err
    if not isinstance(probe, torch.Tensor) or probe.dim() != 2 or probe.shape[0] != 1:
        raise PredictError("the model does not return one row of class scores per input")
    result = run.ctx.ask("predict", model=run.model, inputs=inputs, samples=samples)
    probabilities = result.get("probabilities") if isinstance(result, Mapping) else None
    if not isinstance(probabilities, torch.Tensor) or probabilities.shape[0] != len(inputs):
        raise PredictError("the predict hook did not return one row of probabilities per input")
    return dict(result)


def rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per input: every per-input tensor field (a number, or a list per class)."""
    n = len(result["probabilities"])
    fields = {
        k: v.detach().cpu().tolist()
        for k, v in result.items()
        if isinstance(v, torch.Tensor) and v.dim() in (1, 2) and v.shape[0] == n
    }
    return [{"index": i, **{k: v[i] for k, v in fields.items()}} for i in range(n)]


def format_rows(table: Sequence[Mapping[str, Any]], fmt: str) -> str:
    """JSON lines, or CSV with a list field spread over ``name_0, name_1, ...`` columns."""
    if fmt == "jsonl":
        return "".join(json.dumps(row) + "\n" for row in table)
    flat = []
    for row in table:
        line: dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, list):
                line.update({f"{key}_{i}": v for i, v in enumerate(value)})
            else:
                line[key] = value
        flat.append(line)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(flat[0]) if flat else ["index"])
    writer.writeheader()
    writer.writerows(flat)
    return buffer.getvalue()


def output_format(out: str | Path | None) -> str:
    """``csv`` for a ``.csv`` file, JSON lines otherwise (``.jsonl``, ``.json`` or stdout)."""
    if out is None:
        return "jsonl"
    suffix = Path(out).suffix
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    raise PredictError(f"--out {str(out)!r}: write .jsonl (JSON lines) or .csv")
