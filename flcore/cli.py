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
