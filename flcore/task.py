"""A task: the user's code, named by import path in ``[job] task``.

A task provides ``model()`` and ``client_data(client_id, num_clients)``, and optionally
``server_data()`` and ``loss``. The import path names a module, ``module:object``, or a
module with a ``Task`` class; a class is instantiated with the job's ``[task]`` section
(checked against it when it is an attrs class).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from flcore.errors import JobError
from flcore.settings import build_settings

if TYPE_CHECKING:
    import torch

    from flcore.job import Job


@attrs.frozen
class Task:
    """The loaded task, with the optional parts made explicit."""

    path: str
    impl: Any

    def model(self) -> torch.nn.Module:
        return self.impl.model()

    def client_data(self, client_index: int, num_clients: int) -> Any:
        return self.impl.client_data(client_index, num_clients)

    @property
    def has_server_data(self) -> bool:
        return callable(getattr(self.impl, "server_data", None))

    def server_data(self) -> Any:
        if not self.has_server_data:
            raise JobError(f"task {self.path!r} has no server_data()")
        return self.impl.server_data()

    @property
    def loss(self) -> Callable[..., torch.Tensor] | None:
        return getattr(self.impl, "loss", None)


def load_task(job: Job) -> Task:
    """Import and check the job's task; the current directory is importable, as with ``python -m``."""
    path = job.job.task
    where = job.where("job") + ".task"
    module_name, _, attr = path.partition(":")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise JobError(f"{where}: cannot import task module {module_name!r}: {err}") from err
    if attr:
        try:
            obj: Any = getattr(module, attr)
        except AttributeError:
            raise JobError(f"{where}: module {module_name!r} has no {attr!r}") from None
    else:
        obj = getattr(module, "Task", module)
    if inspect.isclass(obj):
        if attrs.has(obj):
            obj = build_settings(obj, job.task_section, job.where("task"))
        elif job.task_section:
            raise JobError(f"{job.where('task')}: task {path!r} takes no settings")
        else:
            obj = obj()
    elif job.task_section:
        raise JobError(f"{job.where('task')}: task {path!r} takes no settings (it is not a class)")
    for required in ("model", "client_data"):
        if not callable(getattr(obj, required, None)):
            raise JobError(f"{where}: task {path!r} has no {required}()")
    return Task(path=path, impl=obj)
