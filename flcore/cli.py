"""The ``flcore`` command. Imports nothing heavy at module level: ``flcore --help`` and
``flcore hooks`` never load torch."""

from __future__ import annotations

import json
import sys
from typing import Any

import click


def _fail(err: Exception, code: int = 1) -> None:
    click.echo(f"error: {err}", err=True)
    sys.exit(code)


# Options that several commands share, defined once.
out_option = click.option(
    "--out", type=click.Path(file_okay=False), help="Run directory (default runs/NAME-TIME)."
)
resume_option = click.option(
    "--resume",
    type=click.Path(file_okay=False),
    help="Continue the run in this directory from its last completed round.",
)
verbose_option = click.option(
    "-v", "--verbose", is_flag=True, help="Show info events on the console."
)
insecure_option = click.option(
    "--insecure", is_flag=True, help="Plaintext, no TLS (prints a warning)."
)


def set_option(also: str = "") -> Any:
    """``--set SECTION.KEY=VALUE``, repeatable; ``also`` adds to its help."""
    return click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="SECTION.KEY=VALUE",
        help=f"Override a job setting (value read as TOML); repeatable{also}.",
    )


class _Flcore(click.Group):
    """The ``flcore`` group: the core's commands, and those installed plugins add through
    ``register_commands`` before click dispatches (once per process)."""

    _plugins_added = False

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if not _Flcore._plugins_added:
            _Flcore._plugins_added = True
            from flcore.plugins import add_plugin_commands

            add_plugin_commands(self, report=lambda line: click.echo(line, err=True))
        return super().main(*args, **kwargs)


@click.group(cls=_Flcore, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flcore")
def main() -> None:
    """flcore: federated learning from a small core and the plugins you chain."""


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False), required=False)
@set_option()
@out_option
@click.option(
    "--log-format",
    type=click.Choice(["console", "json"]),
    default="console",
    help="Console output: readable lines or JSON lines.",
)
@verbose_option
@resume_option
def run(
    job_file: str | None,
    overrides: tuple[str, ...],
    out: str | None,
    log_format: str,
    verbose: bool,
    resume: str | None,
) -> None:
    """Train the job in JOB_FILE and write a run directory (or continue one: --resume)."""
    from flcore.errors import FLCoreError
    from flcore.job import Job
    from flcore.run import resume_job, run_job

    try:
        if resume is not None:
            if out is not None:
                raise FLCoreError("--resume continues its own run directory: drop --out")
            if overrides and not job_file:
                raise FLCoreError("--set needs the JOB_FILE it overrides")
            given = Job.load(job_file, overrides) if job_file else None
            job = resume_job(resume, given)
        elif job_file is None:
            raise FLCoreError("give a JOB_FILE, or --resume RUN_DIR")
        else:
            job = Job.load(job_file, overrides)
        result = run_job(
            job,
            out=resume or out,
            console=log_format,  # type: ignore[arg-type]
            console_level="info" if verbose else "warning",
            resume=resume is not None,
        )
    except FLCoreError as err:
        _fail(err)
        return
    final = {k: v for k, v in result.final_metrics.items() if k not in {"clients"}}
    click.echo(f"run directory: {result.run_dir}")
    click.echo(f"final metrics: {json.dumps(final, default=str)}")


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@set_option()
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
    """List every installed plugin, its distribution, version and hooks (or why it fails)."""
    from flcore.plugins import list_plugins

    infos = list_plugins()
    if as_json:
        click.echo(json.dumps([i._asdict() for i in infos], indent=2))
        return
    for info in infos:
        origin = "builtin" if info.builtin else f"{info.distribution} {info.version}"
        status = f"FAILED: {info.error}" if info.error else ", ".join(info.hooks) or "no hooks"
        click.echo(f"{info.name:<24} {origin:<32} {status}")


@main.command()
def hooks() -> None:
    """List every hook, the core's and those installed plugins declare, with its one-line
    documentation."""
    from flcore.hookspec_docs import every_hook

    rows = every_hook()
    width = max(len(by) for by, _ in rows)
    for by, (name, kind, side, line) in rows:
        click.echo(f"{name:<26} {kind:<8} {side:<7} {by:<{width}} {line}".rstrip())


_PLAINTEXT_WARNING = (
    "WARNING: --insecure: plaintext gRPC. Models, contributions and client names cross "
    "unencrypted and any process that reaches the port can claim any allowed name. "
    "Use it only on a trusted network or for a test."
)


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--listen", default="0.0.0.0:50051", show_default=True, help="HOST:PORT to serve on.")
@click.option(
    "--certs",
    type=click.Path(file_okay=False),
    help="Folder from `flcore certs` with ca.pem, server.pem and server.key (mutual TLS).",
)
@insecure_option
@set_option("; clients need the same")
@out_option
@resume_option
@verbose_option
def server(
    job_file: str,
    listen: str,
    certs: str | None,
    insecure: bool,
    overrides: tuple[str, ...],
    out: str | None,
    resume: str | None,
    verbose: bool,
) -> None:
    """Serve the job in JOB_FILE to `flcore client` processes over gRPC (mutual TLS)."""
    from pathlib import Path

    from flcore.errors import FLCoreError
    from flcore.job import Job
    from flcore.logging import make_logger
    from flcore.run import resume_job, run_job

    try:
        if certs is not None and insecure:
            raise FLCoreError("give --certs (mutual TLS) or --insecure (plaintext), not both")
        if certs is None and not insecure:
            raise FLCoreError(
                "the server needs --certs DIR (mutual TLS; make one with `flcore certs DIR "
                "--host HOST --client NAME ...`) or, for a trusted network only, --insecure"
            )
        if resume is not None and out is not None:
            raise FLCoreError("--resume continues its own run directory: drop --out")
        job = Job.load(job_file, overrides)
        if resume is not None:
            job = resume_job(resume, job)
        credentials = None
        if certs is not None:
            from flcore.deploy.certs import SERVER, read_identity
            from flcore.deploy.server import server_credentials

            credentials = server_credentials(*read_identity(Path(certs), SERVER))
        else:
            click.echo(_PLAINTEXT_WARNING, err=True)
        _check_address(listen, "--listen")
        from flcore.deploy.server import NetworkRuntime

        runtime = NetworkRuntime(job, listen, credentials, make_logger(None))
        result = run_job(
            job,
            out=resume or out,
            console="console",
            console_level="info" if verbose else "warning",
            resume=resume is not None,
            runtime=runtime,
        )
    except FLCoreError as err:
        _fail(err)
        return
    final = {k: v for k, v in result.final_metrics.items() if k not in {"clients"}}
    click.echo(f"run directory: {result.run_dir}")
    click.echo(f"final metrics: {json.dumps(final, default=str)}")


def _check_address(address: str, option: str) -> None:
    from flcore.errors import FLCoreError

    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise FLCoreError(f"{option} {address!r}: give HOST:PORT (port 0-65535)")


@main.command()
@click.option("--server", "target", required=True, help="HOST:PORT of the `flcore server`.")
@click.option("--name", required=True, help="This client's name (its certificate's name).")
@click.option(
    "--job",
    "job_file",
    type=click.Path(dir_okay=False),
    help="The federation's job file (the server checks it is the same job).",
)
@click.option(
    "--task",
    metavar="MODULE[:OBJECT]",
    help="Without --job: take the job from the server and train this task, this client's "
    "own choice (the server's [job] task and [task] are ignored, never imported).",
)
@click.option(
    "--task-set",
    "task_settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="With --task: a setting of the task's [task] section (value read as TOML); repeatable.",
)
@click.option(
    "--certs",
    type=click.Path(file_okay=False),
    help="Folder with ca.pem (the federation's CA), NAME.pem and NAME.key.",
)
@click.option("--cert", type=click.Path(dir_okay=False), help="Certificate (default NAME.pem).")
@click.option("--key", type=click.Path(dir_okay=False), help="Private key (default NAME.key).")
@insecure_option
@set_option(": the same as the server's")
@click.option(
    "--give-up-after",
    type=click.FloatRange(min=0),
    default=600.0,
    show_default=True,
    help="Seconds to keep retrying an unreachable server.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    default="flcore-client-state",
    show_default=True,
    help="Where this client keeps its per-client state between rounds (one folder per "
    "server run), so a resumed run continues with it.",
)
@verbose_option
def client(
    target: str,
    name: str,
    job_file: str | None,
    task: str | None,
    task_settings: tuple[str, ...],
    certs: str | None,
    cert: str | None,
    key: str | None,
    insecure: bool,
    overrides: tuple[str, ...],
    give_up_after: float,
    state_dir: str,
    verbose: bool,
) -> None:
    """Be client NAME of the federation served at --server until the run ends.

    \b
    Give the job one of two ways:
      --job job.toml            the same job file (and --set) as the server
      --task MODULE[:OBJECT]    take the job from the server, train this task
                                (settings: --task-set KEY=VALUE)
    With --task, the server's job text is read as data; its [job] task and [task]
    are replaced by this client's, and the server checks that all the rest agrees.
    """
    from pathlib import Path

    from flcore.errors import FLCoreError
    from flcore.job import Job
    from flcore.logging import make_logger

    try:
        _check_address(target, "--server")
        if insecure and (certs or cert or key):
            raise FLCoreError("give --certs (mutual TLS) or --insecure (plaintext), not both")
        if not insecure and certs is None:
            raise FLCoreError(
                "the client needs --certs DIR (ca.pem and its certificate) or, for a trusted "
                "network only, --insecure"
            )
        if job_file is not None and (task is not None or task_settings):
            raise FLCoreError("give --job or --task (with --task-set), not both")
        if task is None and task_settings:
            raise FLCoreError("--task-set needs --task")
        if job_file is None and task is None:
            raise FLCoreError(
                "give --job job.toml (the federation's job file) or --task MODULE[:OBJECT] "
                "(this client's task; the rest of the job comes from the server)"
            )
        if job_file is None and overrides:
            raise FLCoreError("--set needs --job (with --task, the job comes from the server)")
        job = Job.load(job_file, overrides) if job_file is not None else None
        credentials = None
        if certs is not None:
            from flcore.deploy.certs import CertError, check_name, read_identity

            folder = Path(certs)
            ca, own_cert, own_key = (
                read_identity(folder, check_name(name)) if not (cert and key) else (b"", b"", b"")
            )
            try:
                if cert:
                    own_cert = Path(cert).read_bytes()
                if key:
                    own_key = Path(key).read_bytes()
                if not ca:
                    ca = (folder / "ca.pem").read_bytes()
            except OSError as err:
                raise CertError(f"cannot read {err.filename}: {err.strerror}") from None
            from flcore.deploy.client import channel_credentials

            credentials = channel_credentials(ca, own_cert, own_key)
        else:
            click.echo(_PLAINTEXT_WARNING, err=True)
        from flcore.deploy.client import serve

        log = make_logger(None, console_level="info" if verbose else "warning").bind(client=name)
        serve(
            job,
            name,
            target,
            credentials,
            log,
            give_up_after=give_up_after,
            task=task,
            task_settings=task_settings,
            state_dir=Path(state_dir) / name,
        )
    except FLCoreError as err:
        _fail(err)
        return
    click.echo(f"{name}: the run ended", err=True)


@main.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="Issue server.pem for this DNS name or IP address; repeatable.",
)
@click.option(
    "--client", "clients", multiple=True, help="Issue NAME.pem for this client; repeatable."
)
@click.option("--ca-name", default="flcore federation", show_default=True, help="The CA's name.")
def certs(folder: str, hosts: tuple[str, ...], clients: tuple[str, ...], ca_name: str) -> None:
    """Make a federation's certificates in FOLDER: its root CA (once; ca.key stays with
    whoever issues certificates), a server certificate, client certificates."""
    from pathlib import Path

    from flcore.deploy.certs import SERVER, check_name, issue, make_ca
    from flcore.errors import FLCoreError

    path = Path(folder)
    try:
        for name in clients:
            check_name(name)
        if make_ca(path, ca_name):
            click.echo(f"created the federation's CA: {path / 'ca.pem'} (keep ca.key private)")
        if hosts:
            click.echo(f"issued {issue(path, SERVER, hosts=list(hosts))} for {', '.join(hosts)}")
        for name in clients:
            click.echo(f"issued {issue(path, name)} for client {name}")
    except FLCoreError as err:
        _fail(err)
