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
    except (FLCoreError, OSError) as err:  # an OSError: a disk the run cannot write
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
passphrase_option = click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False),
    help="File holding the passphrase of this side's private key (else "
    "$FLCORE_KEY_PASSPHRASE; neither: the key is not encrypted).",
)


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--listen", default="0.0.0.0:50051", show_default=True, help="HOST:PORT to serve on.")
@click.option(
    "--certs",
    type=click.Path(file_okay=False),
    help="Folder from `flcore certs` (its server/ bundle: ca.pem, server.pem, server.key and "
    "crl.pem, reread on SIGHUP) for mutual TLS.",
)
@passphrase_option
@insecure_option
@set_option("; clients need the same")
@out_option
@resume_option
@verbose_option
def server(
    job_file: str,
    listen: str,
    certs: str | None,
    passphrase_file: str | None,
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
        credentials = revocations = None
        if certs is not None:
            credentials, revocations = _server_tls(Path(certs), passphrase_file)
        else:
            click.echo(_PLAINTEXT_WARNING, err=True)
        _check_address(listen, "--listen")
        from flcore.deploy.server import NetworkRuntime

        runtime = NetworkRuntime(job, listen, credentials, make_logger(None), revocations)
        result = run_job(
            job,
            out=resume or out,
            console="console",
            console_level="info" if verbose else "warning",
            resume=resume is not None,
            runtime=runtime,
        )
    except (FLCoreError, OSError) as err:  # an OSError: a disk the run cannot write
        _fail(err)
        return
    final = {k: v for k, v in result.final_metrics.items() if k not in {"clients"}}
    click.echo(f"run directory: {result.run_dir}")
    click.echo(f"final metrics: {json.dumps(final, default=str)}")


def _server_tls(folder: Any, passphrase_file: str | None) -> tuple[Any, Any]:
    """The server's mutual-TLS credentials from ``folder`` (or its bundle ``server/``), and
    the revocation list beside its certificate (``crl.pem``, from `flcore certs --revoke`)."""
    from flcore.deploy import certs
    from flcore.deploy.server import server_credentials

    secret = certs.passphrase(passphrase_file, certs.KEY_PASSPHRASE_ENV)
    ca, cert, key = certs.read_identity(folder, certs.SERVER, secret)
    crl = certs.identity_folder(folder, certs.SERVER) / certs.CRL
    return server_credentials(ca, cert, key), certs.Revocations(crl, ca)


def _client_tls(
    folder: Any, name: str, cert: str | None, key: str | None, passphrase_file: str | None
) -> Any:
    """The client's mutual-TLS credentials: ``ca.pem`` and ``NAME.pem``/``NAME.key`` from
    ``folder`` (a bundle, or the issuer's folder), or the files ``cert`` and ``key``."""
    from pathlib import Path

    from flcore.deploy import certs
    from flcore.deploy.client import channel_credentials

    secret = certs.passphrase(passphrase_file, certs.KEY_PASSPHRASE_ENV)
    try:
        if cert and key:
            ca = (folder / certs.CA_CERT).read_bytes()
            own_cert, own_key = Path(cert).read_bytes(), Path(key).read_bytes()
        else:  # the certificate or key not given is NAME's in the folder
            ca, own_cert, own_key = certs.read_identity(folder, certs.check_name(name), secret)
            own_cert = Path(cert).read_bytes() if cert else own_cert
            own_key = Path(key).read_bytes() if key else own_key
    except OSError as err:
        raise certs.CertError(f"cannot read {err.filename}: {err.strerror}") from None
    return channel_credentials(ca, own_cert, certs.unlock_key(own_key, secret, Path(key or name)))


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
    help="Folder with ca.pem (the federation's CA), NAME.pem and NAME.key: the client's "
    "bundle from `flcore certs`, or the issuer's folder that holds it.",
)
@click.option("--cert", type=click.Path(dir_okay=False), help="Certificate (default NAME.pem).")
@click.option("--key", type=click.Path(dir_okay=False), help="Private key (default NAME.key).")
@passphrase_option
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
    passphrase_file: str | None,
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
            credentials = _client_tls(Path(certs), name, cert, key, passphrase_file)
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
    help="Issue the bundle server/ for this DNS name or IP address; repeatable.",
)
@click.option(
    "--client", "clients", multiple=True, help="Issue the bundle NAME/ for this client; repeatable."
)
@click.option(
    "--revoke",
    "revoked",
    multiple=True,
    metavar="NAME",
    help="Revoke this client's certificate: add it to crl.pem, which the server reads at its "
    "start and on SIGHUP; repeatable.",
)
@click.option("--ca-name", default="flcore federation", show_default=True, help="The CA's name.")
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False),
    help="Encrypt the keys issued now with the passphrase in this file (else "
    "$FLCORE_KEY_PASSPHRASE; neither: unencrypted).",
)
@click.option(
    "--ca-passphrase-file",
    type=click.Path(dir_okay=False),
    help="The CA key's passphrase, to make or use it (else $FLCORE_CA_PASSPHRASE, else the "
    "keys' passphrase).",
)
def certs(
    folder: str,
    hosts: tuple[str, ...],
    clients: tuple[str, ...],
    revoked: tuple[str, ...],
    ca_name: str,
    passphrase_file: str | None,
    ca_passphrase_file: str | None,
) -> None:
    """Make a federation's certificates in FOLDER: its root CA (once, in FOLDER/ca/, which
    stays with whoever issues certificates), a bundle per server and client to hand out
    (FOLDER/NAME/: ca.pem, NAME.pem, NAME.key), and the list of revoked clients."""
    from pathlib import Path

    from flcore.deploy import certs as fed
    from flcore.errors import FLCoreError

    path = Path(folder)
    try:
        for name in (*clients, *revoked):
            fed.check_name(name)
        secret = fed.passphrase(passphrase_file, fed.KEY_PASSPHRASE_ENV)
        ca_secret = fed.passphrase(ca_passphrase_file, fed.CA_PASSPHRASE_ENV) or secret
        if fed.make_ca(path, ca_name, secret=ca_secret):
            click.echo(f"created the federation's CA in {path / fed.CA_DIR} (keep it private)")
        issued: list[tuple[str, list[str] | None, str]] = (
            [(fed.SERVER, list(hosts), ", ".join(hosts))] if hosts else []
        )
        issued += [(name, None, f"client {name}") for name in clients]
        for name, names, what in issued:
            cert = fed.issue(path, name, hosts=names, secret=secret, ca_secret=ca_secret)
            click.echo(f"issued {cert.parent}/ for {what}")
        if revoked:
            crl = fed.revoke(path, list(revoked), ca_secret=ca_secret)
            click.echo(f"revoked {', '.join(revoked)} in {crl} (send the server SIGHUP)")
    except FLCoreError as err:
        _fail(err)
