"""A structlog logger per run: JSON lines in ``events.jsonl``, readable lines on the console.

Made by a factory for each run rather than configured globally, so two runs in one
process (tests, notebooks) never share or clobber each other's logs.
"""

from __future__ import annotations

import json
import os
import sys
import weakref
from collections.abc import MutableMapping
from pathlib import Path
from typing import IO, Any, Literal

import structlog

from flcore.durable import StorageError, append_line, open_append

LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50}


class _Sink:
    """The last processor: writes the event to the file and (filtered) to the console.

    Each event is one line written whole (:func:`~flcore.durable.append_line`), so the
    server and its pool workers can append to one file. A write that fails never raises
    into the code that logged: the sink keeps the error and stops writing the file, and the
    training asks for it (:func:`check_log_file`) at its next commit."""

    def __init__(
        self, path: Path | None, console: IO[str], console_format: str, console_level: int
    ) -> None:
        self.path = path
        self.fd = open_append(path) if path is not None else None
        if self.fd is not None:
            self._closer = weakref.finalize(self, os.close, self.fd)
        self.error: StorageError | None = None
        self.console = console
        self.console_level = console_level
        self.json = console_format == "json"
        self.render = structlog.dev.ConsoleRenderer(colors=False)

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        line = json.dumps(event, default=str)
        if self.fd is not None:
            self._write(line)
        if LEVELS.get(method, 20) >= self.console_level:
            text = line if self.json else self.render(logger, method, dict(event))
            print(text, file=self.console, flush=True)
        raise structlog.DropEvent

    def _write(self, line: str) -> None:
        assert self.fd is not None and self.path is not None
        try:
            append_line(self.fd, self.path, (line + "\n").encode())
        except StorageError as err:
            self.error = err
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            self.fd = None
            self._closer()


def make_logger(
    events_path: Path | None = None,
    console_format: Literal["console", "json"] = "console",
    console_level: str = "warning",
    console: IO[str] | None = None,
) -> Any:
    """A bound logger for one run; ``close_logger`` closes its file. Raises
    :class:`~flcore.durable.StorageError` when ``events_path`` cannot be opened."""
    sink = _Sink(events_path, console or sys.stderr, console_format, LEVELS[console_level])
    logger = structlog.wrap_logger(
        None,
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            sink,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(10),
        context_class=dict,
        cache_logger_on_first_use=False,
    )
    return logger.bind()


def _sink(logger: Any) -> _Sink | None:
    """The sink of a logger from :func:`make_logger`, or of any logger bound from it."""
    for processor in getattr(logger, "_processors", ()):
        if isinstance(processor, _Sink):
            return processor
    return None


def check_log_file(logger: Any) -> None:
    """Raise the :class:`~flcore.durable.StorageError` that stopped ``logger`` writing its
    file, if one did (a logger that is not ours has none)."""
    sink = _sink(logger)
    if sink is not None and sink.error is not None:
        raise sink.error


def close_logger(logger: Any) -> None:
    sink = _sink(logger)
    if sink is not None:
        sink.close()
