"""A private network namespace holding only the loopback interface, for tests that start Ray.

Ray resolves 127.0.0.1 to the machine's outward-facing address (the source address of a route to the
internet) for every node it starts, so even a "local" instance would talk over the machine's own network
interface. Inside a namespace whose only interface is ``lo`` no such address exists and every Ray process
binds and connects to 127.0.0.1. A holder process keeps the namespace alive; commands join it with
``nsenter`` (so a head, a worker node and a driver can share it), and it ends with the holder.

    with LoopbackNamespace() as ns:
        subprocess.run(ns.command([sys.executable, "-m", "tests.ray_driver", "2", "calibrate", ...]))
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


class LoopbackNamespace:
    """A network namespace with only ``lo`` (up); :meth:`command` runs an argv inside it."""

    def __init__(self) -> None:
        self.holder: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LoopbackNamespace:
        if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"):
            pytest.skip("tests that start Ray need a loopback-only network namespace (root, unshare, nsenter)")
        self.holder = subprocess.Popen(["unshare", "--net", "sh", "-c", "ip link set lo up && exec sleep 86400"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.holder.poll() is not None:
                error = self.holder.stderr.read().decode(errors="replace") if self.holder.stderr else ""
                pytest.skip(f"cannot create a network namespace here: {error.strip() or 'unshare failed'}")
            probe = subprocess.run(self.command(["ip", "-o", "addr"]), capture_output=True, text=True, check=False)
            if probe.returncode == 0 and "127.0.0.1" in probe.stdout:
                return self
            time.sleep(0.1)
        self.close()
        pytest.skip("the loopback-only network namespace did not come up")

    def command(self, argv: list[str]) -> list[str]:
        assert self.holder is not None
        return ["nsenter", "-t", str(self.holder.pid), "-n", *argv]

    def run_python(self, args: list[str], timeout_s: float = 600,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``python ARGS`` inside the namespace, from the repository root."""
        return subprocess.run(self.command([sys.executable, *args]), cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout_s, check=False, env=env)

    def close(self) -> None:
        if self.holder is not None and self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
