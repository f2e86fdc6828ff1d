"""A job: the TOML file that says what to train and which plugins form the chain."""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from flcore.errors import JobError
from flcore.options import JobSettings, LocalSettings, TrainerOptions
from flcore.settings import build_settings

SECTIONS = ("job", "trainer", "local", "plugins", "task")
#: The largest job file read: a job is a few kB, and this holds ``allowed_clients`` for
#: 100,000 named clients, while the parser's worst case stays around two seconds.
MAX_JOB_BYTES = 4 * 1024 * 1024
#: How deeply tables and arrays may nest (a job needs four or five levels): the parser and
#: every walk over a job after it recurse once per level.
MAX_DEPTH = 32
_KEY_PART = r"""(?:[A-Za-z0-9_-]++|"(?:[^"\\\n]|\\.)*+"|'[^'\n]*+')"""
#: A dotted key of more than MAX_DEPTH parts, found before the parser sees it: tomllib's
#: memory grows with the square of a key's parts (16,000 of them take a GB).
_LONG_KEY = re.compile(
    rf"(?<![A-Za-z0-9_-]){_KEY_PART}(?:[ \t]*+\.[ \t]*+{_KEY_PART}){{{MAX_DEPTH}}}"
)


@attrs.frozen
class Job:
    """A validated job. ``plugin_sections`` and ``task_section`` are checked once their
    owners (plugins, task) are loaded, since only they know their settings."""

    source: str
    job: JobSettings
    trainer: TrainerOptions
    local: LocalSettings
    chain: tuple[str, ...]
    plugin_sections: Mapping[str, Mapping[str, Any]]
    task_section: Mapping[str, Any]
    raw: Mapping[str, Any]
    #: Things worth telling the user that do not stop the job.
    warnings: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: str | Path, overrides: Iterable[str] = ()) -> Job:
        """Read ``path`` and apply ``--set section.key=value`` overrides."""
        path = Path(path)
        try:
            data = loads_toml(read_job_text(path), str(path))
        except tomllib.TOMLDecodeError as err:
            raise JobError(f"{path}: not valid TOML: {err}") from err
        return cls.from_dict(data, source=str(path), overrides=overrides)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], source: str = "<job>", overrides: Iterable[str] = ()
    ) -> Job:
        check_depth(data, source)  # before anything walks it
        data = _deep_copy(data)
        for override in overrides:
            apply_override(data, override, source)
        check_depth(data, source)
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise JobError(
                f"{source}: unknown section [{unknown[0]}]; known sections: {', '.join(SECTIONS)}"
            )
        for section in SECTIONS:
            if not isinstance(data.get(section, {}), dict):
                raise JobError(f"{source}: [{section}] must be a table")
        if "task" not in data.get("job", {}):
            raise JobError(f"{source}: [job] is missing 'task' (the import path of the task)")
        plugins = dict(data.get("plugins", {}))
        chain = plugins.pop("chain", [])
        if not isinstance(chain, list) or not all(isinstance(n, str) for n in chain):
            raise JobError(f"{source}: [plugins].chain must be a list of plugin names")
        if len(set(chain)) != len(chain):
            raise JobError(f"{source}: [plugins].chain names a plugin twice: {chain}")
        warnings = []
        for name, section in plugins.items():
            if not isinstance(section, dict):
                raise JobError(f"{source}: [plugins].{name} must be a table [plugins.{name}]")
            if name not in chain:
                # kept so that a chain can be shortened with --set without editing the file
                warnings.append(
                    f"{source}: [plugins.{name}] is ignored: {name!r} is not in the chain {chain}"
                )
        job = build_settings(JobSettings, data.get("job", {}), f"{source}: [job]")
        _check_counts(job, source)
        _check_deadlines(job, source)
        _check_allowed_clients(job, source)
        return cls(
            source=source,
            job=job,
            trainer=build_settings(TrainerOptions, data.get("trainer", {}), f"{source}: [trainer]"),
            local=build_settings(LocalSettings, data.get("local", {}), f"{source}: [local]"),
            chain=tuple(chain),
            plugin_sections={n: dict(s) for n, s in plugins.items() if n in chain},
            task_section=dict(data.get("task", {})),
            raw=data,
            warnings=tuple(warnings),
        )

    @functools.cached_property
    def client_names(self) -> tuple[str, ...]:
        """The federation's client names in data order: ``[job] allowed_clients``, else
        ``client-0`` ... ``client-N-1``; the same in a simulation and a deployment. Built
        once: with a million clients, each client asking for its own name would rebuild it."""
        if self.job.allowed_clients is not None:
            return tuple(self.job.allowed_clients)
        return tuple(f"client-{i}" for i in range(self.job.clients))

    def where(self, section: str) -> str:
        """How an error message names a section of this job."""
        return f"{self.source}: [{section}]"

    def to_toml(self) -> str:
        """The resolved job, as written to the run directory."""
        return dump_toml(self.raw)


def _check_counts(job: JobSettings, source: str) -> None:
    """The cohort and the quorum fit in the federation, so that a round can pass."""
    if job.min_clients is not None and job.min_clients > job.clients:
        raise JobError(
            f"{source}: [job].min_clients ({job.min_clients}) is above clients ({job.clients})"
        )
    if job.clients_per_round is not None:
        if job.clients_per_round > job.clients:
            raise JobError(
                f"{source}: [job].clients_per_round ({job.clients_per_round}) is above "
                f"clients ({job.clients})"
            )
        if job.min_clients is not None and job.min_clients > job.clients_per_round:
            raise JobError(
                f"{source}: [job].min_clients ({job.min_clients}) is above "
                f"clients_per_round ({job.clients_per_round}): no round could pass"
            )


def _check_deadlines(job: JobSettings, source: str) -> None:
    """Heartbeats come more often than the round's deadline: four missed beats drop a
    client, and beats any sparser could never notice a stalled one before it."""
    if job.heartbeat_interval >= job.round_timeout:
        raise JobError(
            f"{source}: [job].heartbeat_interval ({job.heartbeat_interval:g} s) must be below "
            f"round_timeout ({job.round_timeout:g} s)"
        )


def _check_allowed_clients(job: JobSettings, source: str) -> None:
    """A deployment's names: one per client, each usable in a certificate."""
    if job.allowed_clients is None:
        return
    names = job.allowed_clients
    if len(names) != job.clients or len(set(names)) != len(names):
        raise JobError(
            f"{source}: [job].allowed_clients must name each of the {job.clients} "
            f"clients once, got {names}"
        )
    from flcore.deploy.certs import CertError, check_name

    for name in names:
        try:
            check_name(name)
        except CertError as err:
            raise JobError(f"{source}: [job].allowed_clients: {err}") from None


def read_job_text(path: Path) -> str:
    """A job file's text: at most :data:`MAX_JOB_BYTES` of UTF-8 (a job file named by
    mistake, a binary or ``/dev/zero``, is refused instead of read whole)."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_JOB_BYTES + 1)
    except OSError as err:
        raise JobError(f"cannot read job file {str(path)!r}: {err.strerror or err}") from err
    if len(data) > MAX_JOB_BYTES:
        raise JobError(f"{path}: larger than {MAX_JOB_BYTES >> 20} MiB, too large for a job file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise JobError(
            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None


def loads_toml(text: str, where: str) -> dict[str, Any]:
    """``tomllib.loads`` at a bounded cost: a dotted key longer than :data:`MAX_DEPTH`
    parts, or nesting the parser cannot recurse through, is a JobError naming ``where``
    (:meth:`Job.from_dict` bounds the depth of what it parsed). A syntax error stays a
    ``tomllib.TOMLDecodeError``, for the caller to word."""
    long_key = _LONG_KEY.search(text)
    if long_key is not None:
        line = text.count("\n", 0, long_key.start()) + 1
        raise JobError(f"{where}: line {line}: a dotted key of more than {MAX_DEPTH} parts")
    try:
        data = tomllib.loads(text)
    except RecursionError:
        raise JobError(f"{where}: nested deeper than {MAX_DEPTH} levels") from None
    except tomllib.TOMLDecodeError:
        raise
    except ValueError as err:  # what tomllib lets through: an integer of 4,300 digits
        raise JobError(f"{where}: not valid TOML: {err}") from None
    return data


def check_depth(data: Mapping[str, Any], where: str) -> None:
    """Refuse tables and arrays nested deeper than :data:`MAX_DEPTH`, naming the section.
    A loop, not a recursion: it guards the recursive walks that come after it."""
    stack: list[tuple[Any, int, str]] = [(v, 2, str(k)) for k, v in data.items()]
    while stack:
        value, depth, section = stack.pop()
        if isinstance(value, Mapping):
            children: Iterable[Any] = value.values()
        elif isinstance(value, list | tuple):
            children = value
        else:
            continue
        if depth > MAX_DEPTH:
            raise JobError(f"{where}: [{section}] is nested deeper than {MAX_DEPTH} levels")
        stack.extend((child, depth + 1, section) for child in children)


def apply_override(data: dict[str, Any], override: str, source: str) -> None:
    """Apply ``section.key=value``; the value is read as TOML (``5``, ``0.1``, ``true``,
    ``["a", "b"]``), or taken as a plain string when it is not TOML."""
    if "=" not in override:
        raise JobError(f"--set {override!r}: expected section.key=value")
    dotted, _, text = override.partition("=")
    parts = [p.strip() for p in dotted.split(".")]
    if len(parts) < 2 or not all(parts):
        raise JobError(f"--set {override!r}: the key must be section.key, e.g. job.rounds")
    if len(parts) > MAX_DEPTH:
        raise JobError(f"--set {dotted[:60]}...: a key of more than {MAX_DEPTH} parts")
    try:
        value = loads_toml(f"v = {text}", f"--set {dotted.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    table = data
    for part in parts[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise JobError(f"--set {override!r}: {part!r} in {source} is not a table")
    table[parts[-1]] = value


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def dump_toml(data: Mapping[str, Any]) -> str:
    """Write nested tables of plain values (what ``tomllib`` read) back as TOML."""
    lines: list[str] = []

    def table(prefix: str, values: Mapping[str, Any]) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, Mapping)}
        tables = {k: v for k, v in values.items() if isinstance(v, Mapping)}
        if prefix and (scalars or not tables):
            lines.append(f"[{prefix}]")
        lines.extend(f"{_key(k)} = {_value(v)}" for k, v in scalars.items())
        if scalars:
            lines.append("")
        for k, v in tables.items():
            table(f"{prefix}.{_key(k)}" if prefix else _key(k), v)

    table("", data)
    return "\n".join(lines).rstrip() + "\n"


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _value(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise JobError(f"cannot write {value!r} ({type(value).__name__}) to TOML")
