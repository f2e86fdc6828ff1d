"""Case R: case A (digits MLP 64-128-128-10, 10 IID clients, 20 rounds) on the Ray runtime,
next to the bare loop. Needs flcore-ray (``pip install ./plugins/ray``).

Ray is started once before timing (``ray.init(num_cpus=...)``, as a cluster would already be
up); each timed run starts its actors, loads the clients' data in them, trains and stops
them. Two rows: the whole run, and the rounds alone (the sum of ``metrics.jsonl``'s
per-round seconds), which is the per-round overhead once the actors are up.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.cases import Row, bare, digits_job, median_time
from flcore import codec
from flcore.job import Job
from flcore.run import run_job

HIDDEN, CLIENTS, ROUNDS = 128, 10, 20


def ray_job(hidden: int, clients: int, rounds: int) -> Job:
    """:func:`bench.cases.digits_job` with ``runtime = "ray"`` and ``chain = ["ray"]``."""
    raw: dict[str, Any] = json.loads(json.dumps(digits_job(hidden, clients, rounds).raw))
    raw["job"]["runtime"] = "ray"
    raw["plugins"] = {"chain": ["ray"]}
    return Job.from_dict(raw, source="bench-ray")


def run_on_ray(job: Job) -> tuple[dict[str, torch.Tensor], float]:
    """The final weights, and the seconds spent in rounds (actors already up)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = run_job(job, out=Path(tmp) / "run")
        rounds = sum(line["seconds"] for line in result.history)
        return codec.load_file(result.global_model_path)[0], rounds


def case_ray(repeat: int) -> Iterator[Row]:
    import ray

    from examples.digits import Task

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    try:
        task = Task(hidden=HIDDEN)
        loop = partial(bare, task, CLIENTS, ROUNDS)
        loop()  # warm: data cache, lazy torch imports
        run_on_ray(ray_job(HIDDEN, 2, 1))  # warm: Ray's worker pool
        base_t, base_w = median_time(loop, repeat)
        job = ray_job(HIDDEN, CLIENTS, ROUNDS)
        round_times: list[float] = []

        def ours() -> dict[str, torch.Tensor]:
            weights, seconds = run_on_ray(job)
            round_times.append(seconds)
            return weights

        ours_t, ours_w = median_time(ours, repeat)
        same = all(torch.equal(ours_w[k], base_w[k]) for k in base_w)
        actors = min(CLIENTS, int(ray.cluster_resources().get("CPU", 1)))
        what = f"digits MLP {HIDDEN}, {CLIENTS} clients, {ROUNDS} rounds, Ray ({actors} actors)"
        suffix = "" if same else " (WEIGHTS DIFFER)"
        yield Row("R", what + suffix, ours_t, base_t, "s", "report (actor start-up included)")
        rounds_t = sorted(round_times)[len(round_times) // 2]
        yield Row(
            "R", "  the same, rounds only (actors up)" + suffix, rounds_t, base_t, "s", "report"
        )
    finally:
        if started:
            ray.shutdown()
