"""A structlog logger per run: JSON lines in ``events.jsonl``, readable lines on the console.

Made by a factory for each run rather than configured globally, so two runs in one
process (tests, notebooks) never share or clobber each other's logs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import IO, Any, Literal

import structlog

LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50}


class _Sink:
    """The last processor: writes the event to the file and (filtered) to the console."""

    def __init__(
        self, file: IO[str] | None, console: IO[str], console_format: str, console_level: int
    ) -> None:
        self.file = file
        self.console = console
        self.console_level = console_level
        self.json = console_format == "json"
        self.render = structlog.dev.ConsoleRenderer(colors=False)

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        line = json.dumps(event, default=str)
        if self.file is not None:
            self.file.write(line + "\n")
        if LEVELS.get(method, 20) >= self.console_level:
            text = line if self.json else self.render(logger, method, dict(event))
            print(text, file=self.console, flush=True)
        raise structlog.DropEvent


def make_logger(
    events_path: Path | None = None,
    console_format: Literal["console", "json"] = "console",
    console_level: str = "warning",
    console: IO[str] | None = None,
) -> Any:
    """A bound logger for one run; ``close_logger`` closes its file."""
    file = open(events_path, "a", encoding="utf-8", buffering=1) if events_path else None  # noqa: SIM115
    sink = _Sink(file, console or sys.stderr, console_format, LEVELS[console_level])
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
    logger = logger.bind()
    logger._flcore_file = file
    return logger


def close_logger(logger: Any) -> None:
    file = getattr(logger, "_flcore_file", None)
    if file is not None:
        file.close()
