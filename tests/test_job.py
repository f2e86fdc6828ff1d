from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from flcore.errors import JobError
from flcore.job import Job, dump_toml

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
        (GOOD, ["job.rounds=0"], "rounds must be at least 1"),
        (GOOD, ["job.colour=1"], "[job]: unknown key 'colour'"),
        (GOOD, ["local.lr=fast"], "[local].lr: expected float"),
        (GOOD, ["job.min_clients=9"], "min_clients (9) is above clients (4)"),
        (GOOD, ["plugins.c=1"], "[plugins].c must be a table"),
        (GOOD, ['plugins.chain=["a", "a"]'], "names a plugin twice"),
        (GOOD, ["plugins.chain=3"], "chain must be a list of plugin names"),
        (GOOD, ["rounds=3"], "the key must be section.key"),
        (GOOD, ["job.rounds"], "expected section.key=value"),
        (GOOD, ["job.on_error=ignore"], "'ignore' is not one of 'abort', 'retry'"),
        (GOOD, ["local.validation_split=1.0"], "validation_split must be below 1"),
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
