"""The core's progress display: one line per round, or a live bar on a terminal.

Every round also goes to ``events.jsonl`` as a ``round_end`` event.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from flcore.markers import hookimpl

BAR_WIDTH = 24


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"test": {"accuracy": 0.9}}`` -> ``{"test.accuracy": 0.9}``."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def round_line(ctx: Any) -> str:
    shown = {
        k: v
        for k, v in flatten(ctx.metrics).items()
        if k not in {"round", "clients", "refused", "cohort"}
    }
    parts = [f"round {ctx.round}/{ctx.job.job.rounds}"]
    cohort = len(ctx.metrics.get("cohort", ())) or ctx.job.job.clients
    parts.append(f"clients {len(ctx.metrics.get('clients', []))}/{cohort}")
    if ctx.metrics.get("refused"):
        parts.append(f"refused {len(ctx.metrics['refused'])}")
    parts += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()]
    return "  ".join(parts)


@hookimpl
def end_round(ctx: Any) -> None:
    ctx.log.info(
        "round_end", **{k: v for k, v in ctx.metrics.items() if k != "round"}, round=ctx.round
    )
    if ctx.console == "quiet":
        return
    if ctx.console == "console" and sys.stderr.isatty():
        done = int(BAR_WIDTH * ctx.round / ctx.job.job.rounds)
        bar = "#" * done + "." * (BAR_WIDTH - done)
        end = "\n" if ctx.is_last_round else ""
        sys.stderr.write(f"\r[{bar}] {round_line(ctx)}\033[K{end}")
        sys.stderr.flush()
    elif ctx.console == "console":
        print(round_line(ctx), file=sys.stderr, flush=True)


@hookimpl
def client_register(ctx: Any, client_id: str) -> None:
    ctx.log.info("client_register", client=client_id)


@hookimpl
def client_quit(ctx: Any, client_id: str) -> None:
    ctx.log.info("client_quit", client=client_id)
