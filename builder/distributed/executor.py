"""Scale-out stage: where sweep tasks run -- in this process, or as Ray tasks routed by resources.

Both executors take the same task bodies (builder.distributed.tasks). In-process, ``submit`` runs the body at
once and ``get`` returns its value; on Ray, ``submit`` schedules a task with the given resources (handles of
earlier tasks may be passed as arguments: Ray hands their values over and orders the work), ``put`` shares a
large argument through the object store once, and ``get`` waits for the value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from calib.errors import CalibrationError, ToolkitError


@dataclass(frozen=True, kw_only=True)
class Resources:
    """What one task needs: CPUs, GPUs and custom resources (e.g. ``tensorrt-sm89``: a GPU of that model)."""

    cpus: float = 1.0
    gpus: float = 0.0
    custom: Mapping[str, float] | None = None

    def ray_options(self, retries: int) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.cpus, "max_retries": retries}
        if self.gpus:
            options["num_gpus"] = self.gpus
        if self.custom:
            options["resources"] = dict(self.custom)
        return options


class Executor(Protocol):
    def put(self, value: Any) -> Any: ...

    def submit(self, fn: Callable[..., Any], *args: Any, resources: Resources) -> Any: ...

    def get(self, handle: Any) -> Any: ...


class InProcess:
    """Runs every task at once in this process (the sweep without ``--ray``)."""

    def put(self, value: Any) -> Any:
        return value

    def submit(self, fn: Callable[..., Any], *args: Any, resources: Resources) -> Any:
        return fn(*args)

    def get(self, handle: Any) -> Any:
        return handle


class OnRay:
    """Ray tasks (retried by Ray when a worker dies); a task's user error is raised again unwrapped."""

    def __init__(self, ray: Any, retries: int) -> None:
        self.ray = ray
        self.retries = retries
        self._remote: dict[Callable[..., Any], Any] = {}

    def put(self, value: Any) -> Any:
        return self.ray.put(value)

    def submit(self, fn: Callable[..., Any], *args: Any, resources: Resources) -> Any:
        remote = self._remote.setdefault(fn, self.ray.remote(fn))
        return remote.options(**resources.ray_options(self.retries)).remote(*args)

    def get(self, handle: Any) -> Any:
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            if isinstance(cause, ToolkitError):
                raise cause from None
            raise CalibrationError(f"a sweep task failed: {exc}") from exc


@contextmanager
def executor(address: str | None, retries: int = 3) -> Iterator[Executor]:
    """In-process without ``address``; else Ray at ``address`` (builder.distributed.cluster)."""
    if address is None:
        yield InProcess()
        return
    from builder.distributed.cluster import ray_session

    with ray_session(address) as ray:
        yield OnRay(ray, retries)
