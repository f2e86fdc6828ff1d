"""The parallel local runtime: worker processes, same results as the embedded runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flcore import hookimpl
from flcore.errors import JobError
from flcore.run import run_job
from tests.conftest import ROOT, flcore_in, small_job


@pytest.mark.parametrize("exact", [True, False])
def test_workers_give_byte_identical_weights_to_the_embedded_runtime(
    tmp_path: Path, exact: bool
) -> None:
    job = {"rounds": 3, "clients": 5, "exact_mean": exact}
    sequential = run_job(small_job(job=job), out=tmp_path / "seq")
    parallel = run_job(small_job(job={**job, "workers": 2}), out=tmp_path / "par")
    assert sequential.global_model_path.read_bytes() == parallel.global_model_path.read_bytes()
    assert sequential.history[-1]["test"] == parallel.history[-1]["test"]
    # the workers' events reach the run's event log
    started = [
        e
        for e in map(json.loads, (tmp_path / "par" / "events.jsonl").read_text().splitlines())
        if e["event"] == "worker_started"
    ]
    assert len({e["worker"] for e in started}) == 2
    assert sorted(c for e in started for c in e["clients"]) == [f"client-{i}" for i in range(5)]


def test_plugins_given_in_python_cannot_cross_into_workers(tmp_path: Path) -> None:
    rounds: list[int] = []

    class ServerOnly:
        @hookimpl
        def end_round(self, ctx: Any) -> None:
            rounds.append(ctx.round)

    class ClientSide:
        @hookimpl
        def receive_model(self, ctx: Any) -> None: ...

    run_job(
        small_job(["server"], job={"workers": 2}),
        out=tmp_path / "ok",
        extra_plugins={"server": ServerOnly()},
    )
    assert rounds == [1, 2]  # a plugin with server hooks only stays in the server: fine
    with pytest.raises(JobError, match=r"plugins \['client'\] were given in Python"):
        run_job(
            small_job(["client"], job={"workers": 2}),
            out=tmp_path / "run",
            extra_plugins={"client": ClientSide()},
        )


def test_a_worker_that_dies_fails_only_its_clients_and_is_restarted(
    plugin_env_python: Path, tmp_path: Path
) -> None:
    job = tmp_path / "job.toml"
    job.write_text("""
[job]
name = "crash"
task = "examples.digits"
rounds = 3
clients = 4
min_clients = 2
workers = 2

[task]
hidden = 8

[plugins]
chain = ["crash"]

[plugins.crash]
client = "client-1"
round = 2
""")
    out = tmp_path / "run"
    result = flcore_in(plugin_env_python, "run", str(job), "--out", str(out))
    assert result.returncode == 0, result.stderr
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["clients"] == ["client-0", "client-1", "client-2", "client-3"]
    # worker 1 held client-1 and client-3: both fail in round 2, the others go on; the
    # worker is started again before the next request, and its clients rejoin
    assert rounds[1]["clients"] == ["client-0", "client-2"]
    assert any("worker process died" in r for r in rounds[1]["refused"])
    assert rounds[2]["clients"] == ["client-0", "client-1", "client-2", "client-3"]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    restarted = [e for e in events if e["event"] == "worker_restarted"]
    assert [(e["worker"], e["clients"]) for e in restarted] == [(1, ["client-1", "client-3"])]


def test_a_swag_posterior_is_the_same_from_workers(tmp_path: Path) -> None:
    pytest.importorskip("flcore_swag")
    job = {"rounds": 2, "clients": 3}
    swag = {"epochs": 2, "rank": 2, "samples": 2}
    seq = run_job(small_job(["swag"], job=job, **{"plugins.swag": swag}), out=tmp_path / "seq")
    par = run_job(
        small_job(["swag"], job={**job, "workers": 2}, **{"plugins.swag": swag}),
        out=tmp_path / "par",
    )
    for name in ("global_model.safetensors", "swag.safetensors"):
        assert (seq.run_dir / name).read_bytes() == (par.run_dir / name).read_bytes(), name


def test_replies_come_in_the_order_asked_and_an_abandoned_request_leaves_nothing_behind() -> None:
    """The server folds replies in client order and holds no reply it cannot fold yet; a
    consumer that stops early (a failed round) must not leave replies in the pipes."""
    from flcore import codec
    from flcore.contribution import Contribution
    from flcore.run import prepare

    training = prepare(small_job(job={"clients": 5, "workers": 2}))
    ctx = training.ctx
    ctx.global_model = training.initial_model()
    runtime = training.runtime
    clients = runtime.start(ctx)
    try:
        payload = codec.encode(ctx.global_model, {"kind": "global_model", "round": 1})
        order = ["client-3", "client-0", "client-4", "client-1", "client-2"]
        replies = runtime.run(ctx, "train", payload, order)
        first = next(replies)
        assert first.client_id == "client-3" and first.error is None
        replies.close()  # stops after one reply: four are still on their way
        results = list(runtime.run(ctx, "train", payload, order))
        assert [r.client_id for r in results] == order
        for result in results:
            assert result.error is None and result.payload is not None
            assert Contribution.decode(result.payload, result.client_id).round == 1
        assert sorted(clients) == sorted(order)
    finally:
        runtime.stop(ctx)


def test_a_workers_outbox_sends_in_order_without_holding_up_its_sender() -> None:
    """A reply larger than the pipe's buffer is queued, not written by the caller: the
    worker trains on while the server reads another worker's reply. Messages keep their
    order; once the server is gone, the next send says so."""
    import multiprocessing

    from flcore.runtime.pool import Outbox, _receive

    server, worker = multiprocessing.Pipe()
    outbox = Outbox(worker, depth=2)
    big = bytearray(range(256)) * (1 << 14)  # 4 MiB, far more than a socket buffer holds
    outbox.send({"client": "client-0"}, big)  # returns: nobody reads yet
    outbox.send({"client": "client-1", "error": "boom"})
    outbox.send({"done": True})
    header, payload = _receive(server)
    assert header == {"client": "client-0", "size": len(big)}
    assert payload is not None and bytes(payload) == bytes(big)
    assert _receive(server) == ({"client": "client-1", "error": "boom"}, None)
    assert _receive(server) == ({"done": True}, None)
    server.close()
    outbox.send({"client": "client-2"}, big)  # fails in the thread: the server is gone
    outbox.close()
    with pytest.raises(OSError):
        outbox.send({"done": True})
    worker.close()


def test_a_workers_outbox_holds_at_most_depth_messages_then_waits() -> None:
    """While the server reads nothing, a worker queues ``depth`` messages beyond the one
    being written, and the next send waits: a slow server bounds a worker's memory."""
    import multiprocessing
    import threading

    from flcore.runtime.pool import Outbox, _receive

    server, worker = multiprocessing.Pipe()
    outbox = Outbox(worker, depth=1)
    big = bytearray(4 << 20)  # the writer thread blocks in it: nobody reads
    outbox.send({"client": "client-0"}, big)
    outbox.send({"client": "client-1"}, big)  # may have to wait until the writer took #0
    third = threading.Thread(target=outbox.send, args=({"client": "client-2"}, big))
    third.start()
    third.join(0.5)
    assert third.is_alive()  # one in the writer, one queued: the third waits
    for expected in ("client-0", "client-1", "client-2"):
        header, payload = _receive(server)
        assert header["client"] == expected and payload is not None and len(payload) == len(big)
    third.join()
    outbox.close()
    server.close()
    worker.close()


def test_the_fork_server_preloads_every_flcore_module_a_worker_imports() -> None:
    """A worker imports its entry point's module and the parent's main module again; what
    the fork server did not import, every worker of every run imports at its start."""
    code = (
        "import importlib, sys\n"
        "from flcore.runtime.pool import PRELOAD\n"
        "for name in PRELOAD: importlib.import_module(name)\n"
        "before = set(sys.modules)\n"
        "import flcore.runtime.pool, flcore.cli, flcore.run\n"
        "from flcore.runtime.pool import worker_main\n"
        "import flcore.chain, flcore.client, flcore.job, flcore.logging, flcore.task\n"
        "print(sorted(m for m in set(sys.modules) - before if m.startswith('flcore')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
