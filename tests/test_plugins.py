"""Finding and checking plugins: hook validation, and the commands plugins add."""

from __future__ import annotations

import importlib
import os
import sys
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import click
import pytest

from flcore import hookimpl, hookspec, hookspecs
from flcore import plugins as plugins_module
from flcore.errors import PluginError
from flcore.plugins import add_plugin_commands, check_hooks


class Specs:
    @hookspec
    def best_model_found(self, ctx: Any, round: int) -> None:
        """Side: server."""


class Listener:
    @hookimpl
    def best_model_found(self, ctx: Any, round: int) -> None: ...

    @hookimpl
    def end_round(self, ctx: Any) -> None: ...

    @hookimpl(optionalhook=True)
    def nobody_declares_this(self, ctx: Any) -> None: ...


def test_check_hooks_returns_the_declared_hooks_a_plugin_implements() -> None:
    assert check_hooks("listener", Listener(), [hookspecs, Specs]) == (
        "best_model_found",
        "end_round",
    )
    assert check_hooks("listener", Listener, [hookspecs, Specs]) == (  # a class, as listed
        "best_model_found",
        "end_round",
    )


def test_check_hooks_refuses_a_hook_nobody_declares_naming_the_distribution() -> None:
    with pytest.raises(PluginError) as err:
        check_hooks("listener", Listener(), [hookspecs], "flcore-listener 0.3")
    assert str(err.value) == (
        "plugin 'listener' (distribution flcore-listener 0.3) implements 'best_model_found', "
        "which is no flcore hook"
    )


def test_check_hooks_suggests_the_closest_hook() -> None:
    class Typo:
        @hookimpl
        def before_agregation(self, ctx: Any) -> None: ...

    with pytest.raises(PluginError, match=r"\(did you mean 'before_aggregation'\?\)$"):
        check_hooks("typo", Typo(), [hookspecs])


def test_check_hooks_names_every_argument_the_spec_lacks() -> None:
    class Wrong:
        @hookimpl
        def receive_contribution(self, ctx: Any, contribution: Any, size: int, y: int) -> None: ...

    with pytest.raises(PluginError) as err:
        check_hooks("wrong", Wrong(), [hookspecs])
    assert str(err.value) == (
        "plugin 'wrong' implements 'receive_contribution' with argument 'size', 'y', which "
        "'receive_contribution' does not have (its arguments: ctx, contribution)"
    )


# -- register_commands --------------------------------------------------------------------


def _register(cli: click.Group) -> None:
    @cli.command()
    def hello() -> None:
        click.echo("hello")


class Adds:
    register_commands = staticmethod(hookimpl(_register))


class Raises:
    @staticmethod
    @hookimpl
    def register_commands(cli: click.Group) -> None:
        cli.add_command(click.Command("half"))
        raise RuntimeError("no commands today")


class Replaces:
    @staticmethod
    @hookimpl
    def register_commands(cli: click.Group) -> None:
        cli.add_command(click.Command("run"))


def test_hook_register_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    monkeypatch.setattr(plugins_module, "_command_plugins", lambda report: [("adds", Adds)])
    cli = click.Group("flcore")
    add_plugin_commands(cli, lambda line: None)
    result = CliRunner().invoke(cli, ["hello"])
    assert result.exit_code == 0 and result.output == "hello\n"


def test_a_plugin_that_raises_or_replaces_a_core_command_adds_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    found = [("raises", Raises), ("adds", Adds), ("replaces", Replaces)]
    monkeypatch.setattr(plugins_module, "_command_plugins", lambda report: found)
    cli = click.Group("flcore")
    run = click.Command("run")
    cli.add_command(run)
    lines: list[str] = []
    add_plugin_commands(cli, lines.append)
    assert sorted(cli.commands) == ["hello", "run"] and cli.commands["run"] is run
    assert lines == [
        "warning: plugin 'raises' adds no commands: RuntimeError: no commands today",
        "warning: plugin 'replaces' adds no commands: PluginError: it would replace flcore's "
        "own run",
    ]


def test_which_plugins_add_commands_is_cached_until_a_plugin_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = tmp_path / "src" / "flcore_cache_probe.py"
    source.parent.mkdir()
    source.write_text(
        "from flcore import hookimpl\n\n@hookimpl\ndef register_commands(cli):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(source.parent))
    monkeypatch.delitem(sys.modules, "flcore_cache_probe", raising=False)
    scans: list[int] = []

    def load_installed() -> list[tuple[str, EntryPoint, Any]]:
        scans.append(1)
        ep = EntryPoint("probe", "flcore_cache_probe", "flcore.plugins")
        broken = EntryPoint("broken", "flcore_no_such_module", "flcore.plugins")
        failure = PluginError("plugin 'broken' failed to load: ModuleNotFoundError: ...")
        return [("probe", ep, importlib.import_module(ep.value)), ("broken", broken, failure)]

    monkeypatch.setattr(plugins_module, "load_installed", load_installed)
    lines: list[str] = []
    found = plugins_module._command_plugins(lines.append)
    assert [name for name, _ in found] == ["probe"] and len(scans) == 1
    assert lines == ["warning: plugin 'broken' failed to load: ModuleNotFoundError: ..."]
    lines.clear()
    found = plugins_module._command_plugins(lines.append)
    assert [name for name, _ in found] == ["probe"] and len(scans) == 1  # from the cache
    assert len(lines) == 1 and "plugin 'broken' (distribution unknown unknown" in lines[0]
    # the failed plugin is tried again on every start; a changed plugin means a new scan
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    plugins_module._command_plugins(lines.append)
    assert len(scans) == 2
