"""Helpers for testing flcore and its plugins: separate environments and recording plugins.

A plugin's tests can check what a user would see after ``pip install`` by building an
environment that shares this interpreter's packages (torch is not installed twice) minus
the distributions it must not see, plus the ones it installs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

from flcore.markers import hookimpl


def _normalized(distribution: str) -> str:
    return distribution.replace("-", "_").replace(".", "_").lower()


def _belongs_to(entry: str, distributions: Iterable[str]) -> bool:
    name = entry.lower()
    for dist in map(_normalized, distributions):
        if (
            name == dist
            or name.startswith(f"{dist}-")
            or name.startswith(f"__editable__.{dist}-")
            or name.startswith(f"__editable___{dist}_")
        ):
            return True
    return False


def plugin_distributions() -> list[str]:
    """The installed distributions that register ``flcore.plugins`` entry points."""
    from flcore.plugins import installed_entry_points

    found = {
        ep.dist.metadata["Name"]
        for eps in installed_entry_points().values()
        for ep in eps
        if ep.dist is not None
    }
    return sorted(found - {"flcore"})


def isolated_python(
    dest: Path,
    exclude: Iterable[str] = (),
    install: Iterable[Path] = (),
    only_plugins: Iterable[str] | None = None,
) -> Path:
    """Create an environment at ``dest`` and return its ``python``.

    It sees this interpreter's site-packages entry by entry (symlinks), except those of the
    distributions in ``exclude`` and, when ``only_plugins`` is given, of every plugin
    distribution not named there (so a plugin added later needs no list updated); each path
    in ``install`` is then pip-installed into it (no dependencies, no build isolation: it
    works offline).
    """
    exclude = list(exclude)
    if only_plugins is not None:
        keep = set(only_plugins)
        exclude += [d for d in plugin_distributions() if d not in keep]
    venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(dest)
    python = dest / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        if entry.name == "__pycache__" or _belongs_to(entry.name, exclude):
            continue
        target = site / entry.name
        if not target.exists():
            target.symlink_to(entry)
    for path in install:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                str(python),
                "install",
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                str(path),
            ],
            check=True,
            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        )
    return python


@attrs.frozen
class Environment:
    """An environment made by :func:`install_alone`; :meth:`run` runs its ``python``."""

    python: Path
    root: Path
    cwd: Path

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        return subprocess.run(
            [str(self.python), *args],
            cwd=self.cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def install_alone(plugin_dir: Path, distribution: str, dest: Path, cwd: Path) -> Environment:
    """What a user gets from ``pip install ./plugin_dir`` beside the core: an environment in
    which that plugin, installed from a copy of its directory (the build then writes nothing
    into the source tree), is the only plugin. Its commands run in ``cwd``."""
    source = dest / "src"
    shutil.copytree(
        plugin_dir,
        source,
        ignore=shutil.ignore_patterns("*.egg-info", "build", "tests", "__pycache__"),
    )
    root = dest / "env"
    python = isolated_python(root, exclude=[distribution], only_plugins=[], install=[source])
    return Environment(python=python, root=root, cwd=cwd)


class RecordingPlugin:
    """Records every hook it sees as ``(plugin name, hook)`` in a shared list: order tests."""

    def __init__(self, name: str, calls: list[tuple[str, str]]) -> None:
        self.name = name
        self.calls = calls

    def _record(self, hook: str) -> None:
        self.calls.append((self.name, hook))

    @hookimpl
    def startup(self, ctx: Any) -> None:
        self._record("startup")

    @hookimpl
    def start_round(self, ctx: Any) -> None:
        self._record("start_round")

    @hookimpl
    def before_aggregation(self, ctx: Any) -> None:
        self._record("before_aggregation")

    @hookimpl
    def after_aggregation(self, ctx: Any) -> None:
        self._record("after_aggregation")

    @hookimpl
    def end_round(self, ctx: Any) -> None:
        self._record("end_round")

    @hookimpl
    def rollback(self, ctx: Any) -> None:
        self._record("rollback")

    @hookimpl
    def shutdown(self, ctx: Any) -> None:
        self._record("shutdown")
