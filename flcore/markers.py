"""The two pluggy markers of the ``flcore`` project name."""

from __future__ import annotations

from typing import Final

import pluggy

PROJECT_NAME: Final = "flcore"

hookspec: Final = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl: Final = pluggy.HookimplMarker(PROJECT_NAME)
