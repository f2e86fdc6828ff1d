"""The ``flcore`` command. Imports nothing heavy at module level: ``flcore --help`` and
``flcore hooks`` never load torch."""

from __future__ import annotations

import json
import sys

import click


def _fail(err: Exception, code: int = 1) -> None:
    click.echo(f"error: {err}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flcore")
def main() -> None:
    """flcore: federated learning from a small core and the plugins you chain."""


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override a job setting (value read as TOML); repeatable.",
)
@click.option(
    "--out", type=click.Path(file_okay=False), help="Run directory (default runs/NAME-TIME)."
)
@click.option(
    "--log-format",
    type=click.Choice(["console", "json"]),
    default="console",
    help="Console output: readable lines or JSON lines.",
)
@click.option("-v", "--verbose", is_flag=True, help="Show info events on the console.")
def run(
    job_file: str, overrides: tuple[str, ...], out: str | None, log_format: str, verbose: bool
) -> None:
    """Train the job in JOB_FILE and write a run directory."""
    from flcore.errors import FLCoreError
    from flcore.job import Job
    from flcore.run import run_job

    try:
        job = Job.load(job_file, overrides)
        result = run_job(
            job,
            out=out,
            console=log_format,  # type: ignore[arg-type]
            console_level="info" if verbose else "warning",
        )
    except FLCoreError as err:
        _fail(err)
        return
    final = {k: v for k, v in result.final_metrics.items() if k not in {"clients"}}
    click.echo(f"run directory: {result.run_dir}")
    click.echo(f"final metrics: {json.dumps(final, default=str)}")


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE")
def validate(job_file: str, overrides: tuple[str, ...]) -> None:
    """Check JOB_FILE, its plugins, their settings and its task, without training."""
    from flcore.errors import FLCoreError
    from flcore.job import Job
    from flcore.run import prepare

    try:
        job = Job.load(job_file, overrides)
        prepare(job)
    except FLCoreError as err:
        _fail(err)
        return
    chain = " -> ".join(job.chain) or "(core defaults only)"
    click.echo(
        f"{job_file}: ok ({job.job.rounds} rounds, {job.job.clients} clients, chain {chain})"
    )


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("input_file", metavar="INPUT", type=click.Path(dir_okay=False))
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    help="Posterior samples to average (default: the method's own, e.g. [plugins.swag] samples).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Write the rows to a .jsonl or .csv file (default: JSON lines on stdout).",
)
def predict(run_dir: str, input_file: str, samples: int | None, out: str | None) -> None:
    """Predict with uncertainty for the inputs in INPUT (.npy or .safetensors) with the
    finished run in RUN_DIR: its posterior when its chain left one, else its global model."""
    from pathlib import Path

    from flcore import codec
    from flcore.errors import FLCoreError
    from flcore.logging import make_logger
    from flcore.predict import format_rows, load_run, output_format, predict, read_inputs, rows

    try:
        fmt = output_format(out)
        run = load_run(run_dir, log=make_logger(None, console_level="warning"))
        inputs = read_inputs(input_file)
        result = predict(run, inputs, samples)
        text = format_rows(rows(result), fmt)
        if out is not None:
            codec.write_atomic(Path(out), text.encode())
    except FLCoreError as err:
        _fail(err)
        return
    method = result.get("method", "unknown")
    if out is None:
        click.echo(text, nl=False)
    click.echo(
        f"predicted {len(inputs)} inputs with {method}" + (f"; wrote {out}" if out else ""),
        err=True,
    )


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins(as_json: bool) -> None:
    """List every installed plugin, its distribution, version and hooks."""
    import attrs

    from flcore.plugins import list_plugins

    infos = list_plugins()
    if as_json:
        click.echo(json.dumps([attrs.asdict(i) for i in infos], indent=2))
        return
    for info in infos:
        origin = "builtin" if info.builtin else f"{info.distribution} {info.version}"
        status = f"FAILED: {info.error}" if info.error else ", ".join(info.hooks) or "no hooks"
        click.echo(f"{info.name:<24} {origin:<32} {status}")


@main.command()
def hooks() -> None:
    """List every hook with its one-line documentation."""
    from flcore.hookspec_docs import hook_summaries

    for name, kind, side, line in hook_summaries():
        click.echo(f"{name:<26} {kind:<8} {side:<7} {line}")
