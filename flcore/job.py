"""A job: the TOML file that says what to train and which plugins form the chain."""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from flcore.errors import JobError
from flcore.options import JobSettings, LocalSettings, TrainerOptions
from flcore.settings import build_settings

SECTIONS = ("job", "trainer", "local", "plugins", "task")


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
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise JobError(f"cannot read job file {str(path)!r}: {err.strerror}") from err
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise JobError(f"{path}: not valid TOML: {err}") from err
        return cls.from_dict(data, source=str(path), overrides=overrides)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], source: str = "<job>", overrides: Iterable[str] = ()
    ) -> Job:
        data = _deep_copy(data)
        for override in overrides:
            apply_override(data, override, source)
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
        if job.allowed_clients is not None:
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

    @property
    def client_names(self) -> tuple[str, ...]:
        """The federation's client names in data order: ``[job] allowed_clients``, else
        ``client-0`` ... ``client-N-1``; the same in a simulation and a deployment."""
        if self.job.allowed_clients is not None:
            return tuple(self.job.allowed_clients)
        return tuple(f"client-{i}" for i in range(self.job.clients))

    def where(self, section: str) -> str:
        """How an error message names a section of this job."""
        return f"{self.source}: [{section}]"

    def to_toml(self) -> str:
        """The resolved job, as written to the run directory."""
        return dump_toml(self.raw)


def apply_override(data: dict[str, Any], override: str, source: str) -> None:
    """Apply ``section.key=value``; the value is read as TOML (``5``, ``0.1``, ``true``,
    ``["a", "b"]``), or taken as a plain string when it is not TOML."""
    if "=" not in override:
        raise JobError(f"--set {override!r}: expected section.key=value")
    dotted, _, text = override.partition("=")
    parts = [p.strip() for p in dotted.split(".")]
    if len(parts) < 2 or not all(parts):
        raise JobError(f"--set {override!r}: the key must be section.key, e.g. job.rounds")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
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
