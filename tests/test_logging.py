from __future__ import annotations

import io
import json
from pathlib import Path

from flcore.logging import close_logger, make_logger


def test_every_event_goes_to_the_file_and_warnings_to_the_console(tmp_path: Path) -> None:
    console = io.StringIO()
    log = make_logger(tmp_path / "events.jsonl", console=console).bind(job="j")
    log.debug("fired", hook="start_round")
    log.warning("contribution_refused", reason="NaN")
    close_logger(log)
    lines = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(x["event"], x["level"], x["job"]) for x in lines] == [
        ("fired", "debug", "j"),
        ("contribution_refused", "warning", "j"),
    ]
    assert "contribution_refused" in console.getvalue() and "fired" not in console.getvalue()


def test_the_console_can_speak_json(tmp_path: Path) -> None:
    console = io.StringIO()
    log = make_logger(None, console_format="json", console_level="info", console=console)
    log.info("round_end", round=3)
    assert json.loads(console.getvalue())["round"] == 3
