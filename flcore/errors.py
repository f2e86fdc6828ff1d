"""The errors flcore raises on purpose: each names what was wrong and where."""

from __future__ import annotations


class FLCoreError(Exception):
    """Base of every error that flcore reports to a user as a message, not a traceback."""


class JobError(FLCoreError):
    """The job file, an override or a plugin's settings are wrong; nothing has trained."""


class PluginError(FLCoreError):
    """A plugin the job names is unknown or failed to load."""


class CodecError(FLCoreError):
    """A serialized model, contribution or file is truncated or malformed."""


class ContributionRefused(FLCoreError):
    """One contribution failed validation; the round goes on without it."""


class RoundFailed(FLCoreError):
    """A round could not complete; the previous global model stays."""


class HandlerFailed(RoundFailed):
    """A plugin raised while an event was fired; the round it belongs to is rolled back."""

    def __init__(self, plugin: str, event: str, error: BaseException) -> None:
        self.plugin = plugin
        self.event = event
        self.error = error
        super().__init__(f"plugin {plugin!r} raised in {event!r}: {type(error).__name__}: {error}")
