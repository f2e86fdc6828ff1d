"""A Ray runtime for flcore: virtual clients in Ray actors, on one machine or a cluster.

Name ``ray`` in a job's ``[plugins] chain`` and set ``[job] runtime = "ray"``; settings go in
``[plugins.ray]`` (:class:`RaySettings`). Importing this package imports neither ray nor
torch: they load when a job runs on Ray.
"""

from __future__ import annotations

from flcore_ray.plugin import RUNTIME_NAME, RayPlugin
from flcore_ray.settings import RaySettings

__all__ = ["RUNTIME_NAME", "RayPlugin", "RaySettings"]
