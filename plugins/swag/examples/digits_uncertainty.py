"""The digits uncertainty check: FedAvg's global model against its federated SWAG posterior.

Trains ``examples/digits/swag.toml`` (digits 0-4 over 4 clients, then a SWAG round), or reads
a finished run, and prints accuracy, NLL and ECE on held-out digits 0-4, and the mean predictive
entropy and mutual information on them, on the unseen digits 5-9 and on uniform noise, with
the entropy's AUROC (in- vs. out-of-distribution). Run from the repository root:

    python plugins/swag/examples/digits_uncertainty.py [--run RUN_DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[3]
JOB = ROOT / "examples" / "digits" / "swag.toml"


def out_of_distribution(classes: list[int], noise: int = 500) -> dict[str, torch.Tensor]:
    """The digits the task left out, and uniform noise in the pixels' range [0, 1]."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    unseen = torch.from_numpy((x[~np.isin(y, classes)] / 16.0).astype(np.float32))
    uniform = torch.rand(noise, 64, generator=torch.Generator().manual_seed(0))
    return {"unseen_digits": unseen, "noise": uniform}


def report(run_dir: Path) -> dict[str, dict[str, float]]:
    from flcore_swag.report import uncertainty_report

    from flcore.predict import load_run

    run = load_run(run_dir)
    task = run.ctx.task
    held_out = task.server_data()
    inputs, targets = held_out.tensors
    return uncertainty_report(run, inputs, targets, out_of_distribution(list(task.impl.classes)))


def table(figures: dict[str, dict[str, float]]) -> str:
    keys = list(figures["posterior"])
    lines = [f"{'':<22}{'FedAvg':>10}{'SWAG':>10}"]
    for key in keys:
        fedavg = figures["global"].get(key)
        shown = f"{fedavg:>10.4f}" if fedavg is not None else f"{'-':>10}"
        lines.append(f"{key:<22}{shown}{figures['posterior'][key]:>10.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished run of a digits SWAG job")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # examples.digits, as in a run from the root
    if args.run is None:
        from flcore.job import Job
        from flcore.run import run_job

        args.run = Path(tempfile.mkdtemp(prefix="digits-swag-")) / "run"
        run_job(Job.load(JOB), out=args.run)
    print(f"run: {args.run}")
    print(table(report(args.run)))


if __name__ == "__main__":
    main()
