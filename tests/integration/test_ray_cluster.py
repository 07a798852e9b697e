"""A real Ray cluster on this machine: a head and one worker node started with ``ray start`` on 127.0.0.1.

Head, worker node and driver share a loopback-only network namespace (tests.loopback), so every Ray process
listens on and connects to 127.0.0.1. Sharded calibration through the CLI gives the single-process bytes,
also when a worker process running a shard is killed mid-run (Ray retries the task). The cluster processes
are this test's own: each ``ray start --block`` is a child of the test and stops the Ray processes it started
when it is terminated.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.loopback import REPO_ROOT, LoopbackNamespace

pytestmark = pytest.mark.slow

VIEWS = ("statistics.npz", "ranges.json", "calibration.cache")
# the cluster lives in a private loopback-only namespace: no token is needed to keep others out of it
ENV = dict(os.environ, RAY_AUTH_MODE="disabled")
SHARD_TASK = b"ray::collect_shard"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ray_cli() -> str:
    path = Path(sys.executable).with_name("ray")
    if not path.is_file():
        pytest.skip("the ray command line (the [ray] extra) is not installed")
    return str(path)


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def _descends_from(pid: int, ancestors: set[int]) -> bool:
    while pid > 1:
        if pid in ancestors:
            return True
        pid = _parent(pid)
    return False


def _shard_workers(ancestors: set[int]) -> list[int]:
    """PIDs of Ray workers of this cluster that are running a calibration shard right now."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(SHARD_TASK) and _descends_from(int(entry.name), ancestors):
            found.append(int(entry.name))
    return found


def _wait_for_nodes(namespace: LoopbackNamespace, address: str, nodes: int, timeout_s: float = 180.0) -> None:
    code = ("import ray, sys; ray.init(address=sys.argv[1], configure_logging=False, log_to_driver=False); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        proc = namespace.run_python(["-c", code, address], timeout_s=120, env=ENV)
        if proc.returncode == 0 and proc.stdout.strip().splitlines()[-1:] == [str(nodes)]:
            return
        time.sleep(1.0)
    pytest.fail(f"the Ray cluster at {address} did not reach {nodes} nodes in {timeout_s:.0f} s")


@pytest.fixture
def cluster() -> Iterator[tuple[LoopbackNamespace, str, set[int]]]:
    ray = _ray_cli()
    port = _free_port()
    address = f"127.0.0.1:{port}"
    temp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths live under it
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats",
              f"--temp-dir={temp}"]
    with LoopbackNamespace() as namespace:
        head = subprocess.Popen(namespace.command([ray, "start", "--head", f"--port={port}",
                                                   "--include-dashboard=false", *common]),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        nodes = [head]
        try:
            _wait_for_nodes(namespace, address, 1)
            nodes.append(subprocess.Popen(namespace.command([ray, "start", f"--address={address}", *common]),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV))
            _wait_for_nodes(namespace, address, 2)
            yield namespace, address, {p.pid for p in nodes}
        finally:
            for node in reversed(nodes):
                node.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
            for node in nodes:
                try:
                    node.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    node.kill()
                    node.wait()
            shutil.rmtree(temp, ignore_errors=True)


def _calibrate_command(model: Path, out: Path, *extra: str) -> list[str]:
    return [str(Path(sys.executable).with_name("build-engine")), "calibrate", str(model), "--samples", "128",
            "--method", "percentile", "--percentile", "99.99", "--no-progress", "-o", str(out), *extra]


def test_a_killed_worker_is_retried_and_the_bytes_do_not_change(
        cluster: tuple[LoopbackNamespace, str, set[int]], minilm_onnx: Path, tmp_path: Path) -> None:
    namespace, address, ancestors = cluster
    subprocess.run(_calibrate_command(minilm_onnx, tmp_path / "single"), check=True, capture_output=True)
    run = subprocess.Popen(namespace.command(_calibrate_command(minilm_onnx, tmp_path / "ray", "--ray", address,
                                                                "--shards", "4")),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV, cwd=REPO_ROOT)
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and run.poll() is None and time.monotonic() < deadline:
        workers = _shard_workers(ancestors)
        if workers:
            time.sleep(0.5)  # let it get into the shard
            if workers[0] in _shard_workers(ancestors):
                os.kill(workers[0], signal.SIGKILL)
                killed = workers[0]
        time.sleep(0.1)
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output.decode(errors="replace")[-2000:]
    assert killed is not None, "no shard task was seen running, so none was killed"
    for name in VIEWS:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
    shards = sorted((tmp_path / "ray" / "shards").glob("*.npz"))
    assert len(shards) == 4
    (tmp_path / "ray" / "statistics.npz").unlink()
    shards[1].unlink()  # a run interrupted before its second shard came in: the re-run collects only that one
    again = subprocess.run(namespace.command(_calibrate_command(minilm_onnx, tmp_path / "ray", "--ray", address,
                                                                "--shards", "4")),
                           capture_output=True, text=True, env=ENV, cwd=REPO_ROOT, check=False, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "reused 6 of 8 batches" in again.stdout
    for name in VIEWS:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name
