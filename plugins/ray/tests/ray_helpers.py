"""What the ray plugin's tests share: the paths, and small digits jobs on Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flcore import Job

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parents[2]


def ray_job(chain: list[str] | None = None, **sections: dict[str, Any]) -> Job:
    """A digits job on Ray, small enough for a test: 100 clients, 2 rounds, a narrow MLP.
    ``chain`` is the whole chain (default ``["ray"]``); ``**{"plugins.ray": {...}}`` sets a
    plugin's section."""
    data: dict[str, Any] = {
        "job": {
            "name": "ray",
            "task": "examples.digits",
            "rounds": 2,
            "clients": 100,
            "seed": 0,
            "runtime": "ray",
        },
        "task": {"hidden": 8},
        "local": {"epochs": 1, "batch_size": 32, "lr": 0.1},
        "plugins": {"chain": ["ray"] if chain is None else chain},
    }
    for section, values in sections.items():
        if section.startswith("plugins."):
            data["plugins"][section.split(".", 1)[1]] = values
        else:
            data.setdefault(section, {}).update(values)
    return Job.from_dict(data, source="ray.toml")
