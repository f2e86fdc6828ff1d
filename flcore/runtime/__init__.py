"""Runtimes: where the clients' work runs. The trainer only sees :class:`Runtime`."""

from flcore.runtime.base import ClientResult, Runtime

__all__ = ["ClientResult", "Runtime"]
