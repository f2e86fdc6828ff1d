"""The benchmark cases of the performance issue; each yields :class:`Row`s."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import torch

from bench.baseline import ParallelBareLoop, bare_fedavg
from flcore import codec, hookimpl
from flcore.job import Job
from flcore.run import run_job

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
#: The local training of cases A, B and C, for flcore's jobs and the bare loop alike.
LOCAL: dict[str, Any] = {"epochs": 1, "batch_size": 32, "lr": 0.05}
SEED = 0


@attrs.frozen
class Row:
    case: str
    what: str
    flcore: float
    baseline: float
    unit: str
    target: str
    higher_is_better: bool = False

    @property
    def ratio(self) -> float:
        return self.flcore / self.baseline

    def format(self) -> str:
        return (
            f"{self.case:<6}{self.what:<52}{self.flcore:>9.3f} {self.unit:<2}"
            f"{self.baseline:>9.3f} {self.unit:<2}{self.ratio:>8.3f}  {self.target}"
        )


def median_time(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def interleaved(
    baseline: Callable[[], Any], ours: Callable[[], Any], repeat: int, *more: Callable[[], Any]
) -> list[tuple[float, float, Any]]:
    """``(median wall time, median CPU time of this process, result)`` of each, run in turns
    (baseline, ours, *more, baseline, ...): on a shared machine the load drifts, and a drift
    must not fall on one side of a ratio only. CPU time leaves out the time other tenants
    take the core, so for single-process runs it is the steadier of the two figures."""
    sides = (baseline, ours, *more)
    wall: list[list[float]] = [[] for _ in sides]
    cpu: list[list[float]] = [[] for _ in sides]
    results: list[Any] = [None for _ in sides]
    for _ in range(repeat):
        for side, fn in enumerate(sides):
            start, start_cpu = time.perf_counter(), time.process_time()
            results[side] = fn()
            wall[side].append(time.perf_counter() - start)
            cpu[side].append(time.process_time() - start_cpu)
    return [
        (statistics.median(w), statistics.median(c), r)
        for w, c, r in zip(wall, cpu, results, strict=True)
    ]


def digits_job(hidden: int, clients: int, rounds: int, workers: int | None = None) -> Job:
    job: dict[str, Any] = {
        "name": "bench",
        "task": "examples.digits",
        "rounds": rounds,
        "clients": clients,
        "seed": SEED,
    }
    if workers is not None:
        job["workers"] = workers
    return Job.from_dict(
        {
            "job": job,
            "task": {"hidden": hidden},
            # the baseline neither tests nor validates: neither does this job
            "trainer": {"skip_model_tests": True},
            "local": {**LOCAL, "validation_split": 0.0},
        },
        source="bench",
    )


def bare(
    task: Any, clients: int, rounds: int, indices: list[int] | None = None
) -> dict[str, torch.Tensor]:
    """The bare loop doing the work of :func:`digits_job` (of its clients ``indices``)."""
    return bare_fedavg(
        task, clients, rounds, LOCAL["epochs"], LOCAL["batch_size"], LOCAL["lr"], SEED, indices
    )


def run_flcore(job: Job, rounds_seconds: list[float] | None = None) -> dict[str, torch.Tensor]:
    """Run ``job``; return its final weights. ``rounds_seconds`` gets the run's rounds alone
    (their ``seconds`` in ``metrics.jsonl``: no start-up, no shutdown)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = run_job(job, out=Path(tmp) / "run")
        if rounds_seconds is not None:
            rounds_seconds.append(sum(line["seconds"] for line in result.history))
        return codec.load_file(result.global_model_path)[0]


def training(
    case: str, hidden: int, clients: int, rounds: int, workers: int | None, target: str, repeat: int
) -> Iterator[Row]:
    from examples.digits import Task

    job = digits_job(hidden, clients, rounds, workers)
    task = Task(hidden=hidden)
    loop = partial(bare, task, clients, rounds)
    loop()  # warm: data cache, lazy torch imports
    run_flcore(digits_job(hidden, 2, 1))
    rounds_t: list[float] = []
    if not workers:
        (base_t, base_cpu, base_w), (ours_t, ours_cpu, ours_w) = interleaved(
            loop, lambda: run_flcore(job, rounds_t), repeat
        )
    else:  # the best case's runs alternate with these too: it sees the same drift
        by_hand = ParallelBareLoop(
            task, clients, rounds, LOCAL["epochs"], LOCAL["batch_size"], LOCAL["lr"], SEED, workers
        )
        best_t: list[float] = []
        try:
            (base_t, _, base_w), (ours_t, _, ours_w), (_, _, (_, best_w)) = interleaved(
                loop, lambda: run_flcore(job, rounds_t), repeat, lambda: _timed(by_hand, best_t)
            )
        finally:
            by_hand.close()
    same = _equal(ours_w, base_w)
    runtime = f"{workers} workers" if workers else "sequential"
    what = f"digits MLP {hidden}, {clients} clients, {rounds} rounds, {runtime}"
    yield Row(case, what + ("" if same else " (WEIGHTS DIFFER)"), ours_t, base_t, "s", target)
    if not workers:  # one process, one thread: its CPU time is its work, without the noise
        yield Row(case, "  the same, CPU time", ours_cpu, base_cpu, "s", "(steadier)")
        return
    # what the pool costs once per run, apart from what it costs per round
    rounds_only = statistics.median(rounds_t)
    yield Row(
        case,
        f"  the same, rounds only ({ours_t - rounds_only:.2f} s start-up)",
        rounds_only,
        base_t,
        "s",
        "(for reference)",
    )
    what = f"  the bare loop in {workers} processes, averaged each round"
    yield Row(
        case,
        what + ("" if _equal(best_w, base_w) else " (WEIGHTS DIFFER)"),
        statistics.median(best_t),
        base_t,
        "s",
        "(best case, rounds)",
    )


def _timed(loop: ParallelBareLoop, seconds: list[float]) -> Any:
    """A run of ``loop``, its own timing of the rounds kept in ``seconds``."""
    took, weights = loop.run()
    seconds.append(took)
    return took, weights


def _share_of_bare_loop(
    hidden: int, clients: int, rounds: int, indices: list[int], repeat: int, start: Any, out: Any
) -> None:
    """One process of :func:`side_by_side`: the bare loop over ``indices``, ``repeat`` times,
    each started with the other processes at the barrier ``start``; wall times to ``out``."""
    import torch

    from examples.digits import Task

    torch.set_num_threads(1)
    task = Task(hidden=hidden)
    bare(task, clients, 1, indices)  # warm, as the bare loop is
    for _ in range(repeat):
        start.wait()
        begin = time.perf_counter()
        bare(task, clients, rounds, indices)
        out.put(time.perf_counter() - begin)


def side_by_side(hidden: int, clients: int, rounds: int, processes: int, repeat: int) -> float:
    """The bare loop's clients dealt to ``processes`` processes that train them at the same
    time (without averaging across processes): the median time until the slowest is done.
    No runtime on this machine can train the same clients in parallel faster: it is the
    floor for the pool, measured, including what the cores cost each other when both work
    (shared caches, memory, and on a virtual machine, the host's other tenants)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    start, out = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(
            target=_share_of_bare_loop,
            args=(hidden, clients, rounds, list(range(p, clients, processes)), repeat, start, out),
        )
        for p in range(processes)
    ]
    for worker in workers:
        worker.start()
    slowest = [max(out.get() for _ in workers) for _ in range(repeat)]
    for worker in workers:
        worker.join()
    return statistics.median(slowest)


def case_a(repeat: int) -> Iterator[Row]:
    yield from training("A", 128, 10, 20, None, "<= 1.15", repeat)


def case_b(repeat: int) -> Iterator[Row]:
    yield from training("B", 1024, 10, 20, None, "<= 1.15", repeat)
    rows = list(training("B2", 1024, 10, 20, 2, "<= 0.65 (2 cores)", repeat))  # needs workers
    yield from rows
    yield Row(
        "B2",
        "  2 bare loops side by side, 5 clients each (floor)",
        side_by_side(1024, 10, 20, 2, repeat),
        rows[0].baseline,
        "s",
        "(this machine's floor)",
    )


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def case_c(repeat: int) -> Iterator[Row]:
    yield from training("C", 128, 50, 10, None, "<= 1.15", repeat)


def case_d(repeat: int) -> Iterator[Row]:
    """Aggregation throughput: GB/s of client weights read, next to a plain copy of the same
    bytes. The ``aggregate`` hook's FedAvg gets all contributions at once; the trainer's
    streaming fold gets them one at a time as they arrive (exact, and ``exact_mean = false``)."""
    from flcore.aggregation import WeightedMean
    from flcore.contribution import Contribution
    from flcore.defaults.fedavg import aggregate

    shapes = [(5000, 4000)] * 5 + [(1000,)] * 5  # 25 M parameters
    gen = torch.Generator().manual_seed(0)
    clients = [
        ({f"t{j}": torch.randn(s, generator=gen) for j, s in enumerate(shapes)}, 10 + i)
        for i in range(10)
    ]
    contributions = [
        Contribution(f"client-{i}", 1, weights, n, 1) for i, (weights, n) in enumerate(clients)
    ]
    nbytes = sum(t.numel() * t.element_size() for w, _ in clients for t in w.values())
    targets = {k: torch.empty_like(v) for k, v in clients[0][0].items()}

    def copy_all() -> None:
        for weights, _ in clients:
            for k, v in weights.items():
                targets[k].copy_(v)

    def streamed(exact: bool) -> None:
        mean = WeightedMean(exact)
        for weights, n in clients:
            mean.add(weights, n)
        mean.result()

    ways: dict[str, Callable[[], Any]] = {
        "aggregate hook, all at once, exact": lambda: aggregate(None, contributions),
        "streaming fold, exact float64": partial(streamed, True),
        "streaming fold, exact_mean = false": partial(streamed, False),
    }
    copy_all()  # warm, as each way below is: the first copy also faults in the targets
    copy_t, _ = median_time(copy_all, repeat)
    for label, fn in ways.items():
        fn()
        agg_t, _ = median_time(fn, repeat)
        yield Row(
            "D",
            f"FedAvg 10 x 25 M, {label} (GB/s)",
            nbytes / agg_t / GB,
            nbytes / copy_t / GB,
            "GB",
            # the target is the aggregate path's; a streaming fold also reads and writes
            # its sum for every contribution (see bench/README.md)
            ">= 0.7" if label.startswith("aggregate") else "(for reference)",
            higher_is_better=True,
        )


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """A server-only plugin: the growth of the server process's peak resident set from
    ``startup`` (the model built, nothing sent) to ``finish`` (the round committed)."""

    def __init__(self) -> None:
        self.before = 0
        self.growth = 0

    @hookimpl
    def startup(self, ctx: Any) -> None:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current size
        self.before = _status("VmRSS:")

    @hookimpl
    def finish(self, ctx: Any) -> None:
        self.growth = _status("VmHWM:") - self.before


def case_e(repeat: int) -> Iterator[Row]:
    """Server memory for one round of N clients of a 10 M-parameter model, clients in two
    worker processes so that the server process holds only the server's work."""
    model_bytes = 10_000_000 * 4
    for clients in (10, 100):
        job = Job.from_dict(
            {
                "job": {
                    "name": "bench-e",
                    "task": "bench.tasks:Wide",
                    "rounds": 1,
                    "clients": clients,
                    "workers": 2,
                },
                "trainer": {"skip_model_tests": True},
                "local": {"validation_split": 0.0, "lr": 0.001},
                "plugins": {"chain": ["peak"]},
            },
            source="bench",
        )
        peak = PeakMemory()
        with tempfile.TemporaryDirectory() as tmp:
            run_job(job, out=Path(tmp) / "run", extra_plugins={"peak": peak})
        yield Row(
            "E",
            f"server peak RSS growth, 1 round, {clients} x 10 M params (MB)",
            peak.growth / 1e6,
            model_bytes / 1e6,
            "MB",
            "<= 3 (model sizes)",
        )


def case_f(repeat: int) -> Iterator[Row]:
    """Start-up: ``flcore --help`` and ``flcore plugins`` next to a bare interpreter."""
    flcore = [sys.executable, "-m", "flcore"]

    def wall(cmd: list[str]) -> float:
        t, _ = median_time(
            lambda: subprocess.run(cmd, capture_output=True, check=True, cwd=ROOT, env=os.environ),
            max(repeat, 5),
        )
        return t

    python = wall([sys.executable, "-c", "pass"])
    yield Row(
        "F",
        "flcore --help (s, vs python -c pass)",
        wall([*flcore, "--help"]),
        python,
        "s",
        "< 0.3 s",
    )
    yield Row(
        "F",
        "flcore plugins (s, vs python -c pass)",
        wall([*flcore, "plugins"]),
        python,
        "s",
        "< 1 s",
    )


def case_r(repeat: int) -> Iterator[Row]:
    """Case A on the Ray runtime (needs flcore-ray installed)."""
    from bench.ray_case import case_ray

    yield from case_ray(repeat)


CASES: dict[str, Callable[[int], Iterator[Row]]] = {
    "A": case_a,
    "B": case_b,
    "C": case_c,
    "D": case_d,
    "E": case_e,
    "F": case_f,
    "R": case_r,
}
