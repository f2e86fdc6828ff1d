from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from flcore.errors import JobError
from flcore.job import MAX_DEPTH, MAX_JOB_BYTES, Job, dump_toml
from flcore.options import MAX_CLIENTS, MAX_MESSAGE_MB, MAX_SECONDS, MAX_WORKERS
from tests.conftest import ROOT

GOOD = """
[job]
name = "digits"
task = "examples.digits"
rounds = 3
clients = 4

[local]
lr = 0.1

[plugins]
chain = ["a", "b"]

[plugins.a]
k = 1
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def test_a_job_file_is_read_with_defaults(tmp_path: Path) -> None:
    job = Job.load(write(tmp_path, GOOD))
    assert job.job.rounds == 3 and job.job.clients == 4 and job.job.seed == 0
    assert job.job.required_clients() == 4  # min_clients defaults to every client
    assert job.local.lr == 0.1 and job.local.epochs == 1
    assert job.trainer.skip_model_tests is False
    assert job.trainer.model_test_after_each_round is True
    assert job.trainer.delete_local_models_after_aggregation is True
    assert job.chain == ("a", "b")
    assert job.plugin_sections == {"a": {"k": 1}}


def test_overrides_are_typed(tmp_path: Path) -> None:
    job = Job.load(
        write(tmp_path, GOOD),
        [
            "job.rounds=5",
            "local.lr=0.01",
            "job.name=other",
            'plugins.chain=["b"]',
            "trainer.skip_model_tests=true",
            "plugins.b.x=[1, 2]",
        ],
    )
    assert job.job.rounds == 5 and job.local.lr == 0.01 and job.job.name == "other"
    assert job.trainer.skip_model_tests is True
    assert job.chain == ("b",)
    assert job.plugin_sections == {"b": {"x": [1, 2]}}
    assert job.warnings == (
        f"{tmp_path / 'job.toml'}: [plugins.a] is ignored: 'a' is not in the chain ['b']",
    )


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("[job\n", [], "job.toml: not valid TOML"),
        ("[job]\nname='x'\n", [], "[job] is missing 'task'"),
        (GOOD + "\n[extra]\n", [], "unknown section [extra]"),
        (GOOD, ["job.rounds=many"], "[job].rounds: expected int, got str 'many'"),
        (GOOD, ["job.rounds=0"], "[job].rounds: must be >= 1, got 0"),
        (GOOD, ["job.colour=1"], "[job]: unknown key 'colour'"),
        (GOOD, ["local.lr=fast"], "[local].lr: expected float"),
        (GOOD, ["job.min_clients=9"], "min_clients (9) is above clients (4)"),
        (GOOD, ["plugins.c=1"], "[plugins].c must be a table"),
        (GOOD, ['plugins.chain=["a", "a"]'], "names a plugin twice"),
        (GOOD, ["plugins.chain=3"], "chain must be a list of plugin names"),
        (GOOD, ["rounds=3"], "the key must be section.key"),
        (GOOD, ["job.rounds"], "expected section.key=value"),
        (GOOD, ["job.on_error=ignore"], "'ignore' is not one of 'abort', 'retry'"),
        (GOOD, ["local.validation_split=1.0"], "[local].validation_split: must be < 1.0, got 1.0"),
    ],
)
def test_bad_job_files_name_the_key_and_file(
    tmp_path: Path, text: str, overrides: list[str], message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(JobError) as err:
        Job.load(path, overrides)
    assert message in str(err.value)
    assert str(path) in str(err.value) or "--set" in str(err.value)


def test_a_missing_job_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(JobError, match=r"cannot read job file .*nope\.toml"):
        Job.load(tmp_path / "nope.toml")


def test_the_resolved_job_round_trips_through_toml(tmp_path: Path) -> None:
    job = Job.load(write(tmp_path, GOOD), ["job.rounds=7", 'job.name="a \\"q\\" b"'])
    again = tomllib.loads(job.to_toml())
    assert again == job.raw
    assert Job.from_dict(again).job.rounds == 7


def test_dump_toml_writes_nested_tables_and_inline_values() -> None:
    data = {"a": {"x": 1.5, "y": [True, "s"], "b": {"z": {"k": 1}}}}
    assert tomllib.loads(dump_toml(data)) == data


CPUS = os.cpu_count()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # what the attack on the job file got accepted
        (
            ["job.heartbeat_interval=nan"],
            "[job].heartbeat_interval: must be a finite number, got nan",
        ),
        (["job.round_timeout=nan"], "[job].round_timeout: must be a finite number, got nan"),
        (["job.join_timeout=inf"], "[job].join_timeout: must be a finite number, got inf"),
        (["local.lr=nan"], "[local].lr: must be a finite number, got nan"),
        (["local.momentum=nan"], "[local].momentum: must be a finite number, got nan"),
        (["local.weight_decay=inf"], "[local].weight_decay: must be a finite number, got inf"),
        (["local.lr=-inf"], "[local].lr: must be a finite number, got -inf"),
        (
            ["job.threads=1000000"],
            f"[job].threads: must be <= {CPUS} (this machine's CPU count), got 1000000",
        ),
        (
            ["job.max_message_mb=1000000000000"],
            f"[job].max_message_mb: must be <= {MAX_MESSAGE_MB}, got 1000000000000",
        ),
        (["job.clients=1000000000"], f"[job].clients: must be <= {MAX_CLIENTS}, got 1000000000"),
        (["job.workers=100000"], f"[job].workers: must be <= {MAX_WORKERS}, got 100000"),
        # timeouts: finite, positive, and short enough to wait on
        (["job.join_timeout=1e300"], f"[job].join_timeout: must be <= {MAX_SECONDS}, got 1e+300"),
        (["job.round_timeout=0"], "[job].round_timeout: must be >= 0.1, got 0.0"),
        (["job.heartbeat_interval=-1"], "[job].heartbeat_interval: must be >= 0.05, got -1.0"),
        (
            ["job.heartbeat_interval=60", "job.round_timeout=30"],
            "[job].heartbeat_interval (60 s) must be below round_timeout (30 s)",
        ),
        (["job.seed=18446744073709551616"], "[job].seed: must be <= 18446744073709551615"),
    ],
)
def test_settings_are_finite_and_bounded(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    path = write(tmp_path, GOOD)
    with pytest.raises(JobError) as err:
        Job.load(path, overrides)
    assert f"{path}: {message}" in str(err.value)


def test_non_finite_floats_in_the_file_itself_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("lr = 0.1", "lr = nan"))
    with pytest.raises(
        JobError, match=r"job\.toml: \[local\]\.lr: must be a finite number, got nan"
    ):
        Job.load(path)


def test_the_bounds_themselves_are_accepted(tmp_path: Path) -> None:
    job = Job.load(
        write(tmp_path, GOOD),
        [
            f"job.clients={MAX_CLIENTS}",
            f"job.workers={MAX_WORKERS}",
            f"job.threads={CPUS}",
            f"job.max_message_mb={MAX_MESSAGE_MB}",
            f"job.join_timeout={MAX_SECONDS}",
        ],
    )
    assert job.job.clients == MAX_CLIENTS and len(job.client_names) == MAX_CLIENTS
    assert job.client_names is job.client_names  # built once, not per client


def deep_array(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[job]\ntask = 'x'\nname = '\xff\xfe'\n", "not UTF-8 text (byte 0xff at offset 25)"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8 text (byte 0x89 at offset 0)"),
        (f"[task]\nx = {deep_array(100_000)}\n".encode(), f"nested deeper than {MAX_DEPTH} levels"),
        (
            f"[task]\nx = {deep_array(MAX_DEPTH)}\n".encode(),
            f"[task] is nested deeper than {MAX_DEPTH} levels",
        ),
        (
            ("[task]\nx = " + "{a = " * 5000 + "1" + "}" * 5000).encode(),
            f"nested deeper than {MAX_DEPTH} levels",
        ),
        (
            ("[job]\n" + "a" + ".a" * 100_000 + " = 1\n").encode(),
            f"line 2: a dotted key of more than {MAX_DEPTH} parts",
        ),
        (
            ("[a" + ' . "a"' * 100_000 + "]\n").encode(),
            f"line 1: a dotted key of more than {MAX_DEPTH} parts",
        ),
        (b"[job]\nseed = 1" + b"0" * 5000 + b"\n", "not valid TOML: Exceeds the limit"),
        (b"x" * (MAX_JOB_BYTES + 1), "larger than 4 MiB, too large for a job file"),
    ],
)
def test_an_unreadable_job_file_is_named_with_the_problem(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "job.toml"
    path.write_bytes(content)
    with pytest.raises(JobError) as err:
        Job.load(path)
    assert f"{path}: {message}" in str(err.value)


def test_a_directory_is_not_a_job_file(tmp_path: Path) -> None:
    with pytest.raises(JobError, match=r"cannot read job file .*: Is a directory"):
        Job.load(tmp_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (f"task.x={deep_array(100_000)}", f"--set task.x: nested deeper than {MAX_DEPTH} levels"),
        (f"task.x={deep_array(MAX_DEPTH)}", f"[task] is nested deeper than {MAX_DEPTH} levels"),
        ("task" + ".a" * 100_000 + "=1", f"a key of more than {MAX_DEPTH} parts"),
        ("job.seed=1" + "0" * 5000, "--set job.seed: not valid TOML: Exceeds the limit"),
    ],
)
def test_an_override_is_bounded_like_the_file(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(JobError) as err:
        Job.load(write(tmp_path, GOOD), [override])
    assert message in str(err.value)


def test_deep_data_given_in_python_is_refused_before_anything_walks_it() -> None:
    deep: dict = {"x": 1}
    for _ in range(10_000):  # deeper than the interpreter could recurse
        deep = {"x": deep}
    with pytest.raises(JobError, match=rf"<job>: \[task\] is nested deeper than {MAX_DEPTH}"):
        Job.from_dict({"job": {"task": "examples.digits"}, "task": deep})


def flcore(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flcore", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("content", "overrides", "message"),
    [
        (GOOD.encode(), ["local.lr=nan"], "[local].lr: must be a finite number, got nan"),
        (GOOD.encode(), ["job.clients=1000000000"], f"[job].clients: must be <= {MAX_CLIENTS}"),
        (b"[job]\ntask = '\xc3('\n", [], "not UTF-8 text (byte 0xc3 at offset 14)"),
        (f"[task]\nx = {deep_array(100_000)}\n".encode(), [], "nested deeper than"),
        # a task's and a plugin's own settings go through the same check
        (GOOD.encode(), ["plugins.chain=[]", "task.alpha=nan"], "[task].alpha: must be a finite"),
        (
            GOOD.encode(),
            ['plugins.chain=["swag"]', "plugins.swag.scale=inf"],
            "[plugins.swag].scale: must be a finite number, got inf",
        ),
    ],
)
def test_flcore_validate_says_what_is_wrong_without_a_traceback(
    tmp_path: Path, content: bytes, overrides: list[str], message: str
) -> None:
    path = tmp_path / "job.toml"
    path.write_bytes(content)
    result = flcore("validate", str(path), *[f"--set={o}" for o in overrides], cwd=ROOT)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert str(path) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
