"""Scale-out stage: connecting to Ray (the only module that calls ``ray.init``), and checking resources.

``--ray`` takes what ``ray.init(address=...)`` takes: ``auto`` (the running cluster: ``RAY_ADDRESS`` or the
one ``ray start --head`` started on this machine), ``local`` (a private Ray instance on this machine, shut
down afterwards), ``HOST:PORT`` (a cluster's GCS address) or ``ray://HOST:10001`` (Ray Client). A Ray already
initialised by the caller (a notebook, a test) is used as it is and left running.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator, Mapping
from types import ModuleType

from calib.errors import BackendUnavailable, ConfigError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'build-engine[ray]'"
CONNECT_TIMEOUT_S = 5.0  # a head that does not accept a TCP connection by then is reported, not waited on


def load_ray() -> ModuleType:
    """The ``ray`` module, or BackendUnavailable (exit 5) naming the extra to install."""
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailable(f"Ray is not installed ({exc}); {INSTALL_HINT}, or run without --ray") from exc
    return ray


def check_address(address: str) -> str:
    """``address`` when it is one ``ray.init`` understands (see the module docstring), else ConfigError."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--ray {address!r} is not auto, local, HOST:PORT or ray://HOST:PORT "
                          "(e.g. --ray auto, --ray 127.0.0.1:6379)")
    return address


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """ConfigError unless a ``HOST:PORT`` or ``ray://HOST:PORT`` address accepts a TCP connection.

    ``ray.init`` retries an address where nothing listens for minutes, logging warnings; a wrong host or port
    fails here within ``timeout`` seconds instead. ``auto`` and ``local`` are Ray's own to resolve.
    """
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot reach Ray at {address!r}: {exc or type(exc).__name__}. Check the head's address "
                          "and port (`ray status` on the head prints it), start one with `ray start --head`, or use "
                          "--ray local for a private Ray on this machine") from exc


@contextlib.contextmanager
def ray_session(address: str, *, num_cpus: int | None = None) -> Iterator[ModuleType]:
    """Ray connected to ``address`` for the block (``num_cpus`` only sizes a ``local`` instance)."""
    ray = load_ray()
    if ray.is_initialized():
        yield ray
        return
    address = check_address(address)
    check_reachable(address)
    try:
        ray.init(address=address, num_cpus=num_cpus if address == "local" else None, include_dashboard=False,
                 configure_logging=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot connect to Ray at {address!r}: {exc}. Start a cluster with `ray start --head` "
                          "(then --ray auto), or use --ray local for a private one on this machine") from exc
    logger.info("connected to Ray at %s: %s", address, cluster_summary(ray))
    try:
        yield ray
    finally:
        ray.shutdown()


def cluster_summary(ray: ModuleType) -> str:
    resources = ray.cluster_resources()
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if not k.startswith("node:"))


def require_resources(ray: ModuleType, needed: Mapping[str, float], what: str) -> None:
    """ConfigError when no node of the cluster offers ``needed`` (a task would wait forever)."""
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    if any(all(res.get(k, 0.0) >= v for k, v in needed.items()) for res in nodes):
        return
    have = sorted({k for res in nodes for k in res if not k.startswith("node:")})
    wanted = ", ".join(f"{k}={v:g}" for k, v in needed.items())
    raise ConfigError(f"no node of the Ray cluster offers {wanted} for {what}; the nodes offer {', '.join(have)}. "
                      "Start a node with the resource, e.g. `ray start --address HEAD:6379 --num-gpus 1 "
                      "--resources '{\"tensorrt-sm89\": 1}'` on a machine with that GPU")
