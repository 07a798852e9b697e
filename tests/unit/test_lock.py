"""The output-folder lock (builder/cli/lock.py) and the output checks it runs first (builder/engine/outputs.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from builder.cli.lock import LOCK_FILE, LockHolder, claim_output_dir, claim_output_file, output_lock
from builder.engine.outputs import check_output_dir, check_output_file
from calib.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def _sleeping_process() -> Iterator[int]:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield child.pid
    finally:
        child.kill()
        child.wait()


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def _lock_text(pid: int, host: str | None = None, command: str = "build") -> str:
    return json.dumps({"pid": pid, "host": host or socket.gethostname(), "command": command,
                       "since": "2031-01-02T03:04:05+00:00"})


def test_the_lock_names_its_holder_while_held_and_is_gone_after(tmp_path: Path) -> None:
    with output_lock(tmp_path, "calibrate") as me:
        recorded = json.loads((tmp_path / LOCK_FILE).read_text())
        assert recorded == {"pid": os.getpid(), "host": socket.gethostname(), "command": "calibrate",
                            "since": me.since}
        assert time.time() - time.mktime(time.strptime(me.since[:19], "%Y-%m-%dT%H:%M:%S")) < 60
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_second_holder_is_refused_with_pid_command_and_start_time(tmp_path: Path) -> None:
    with output_lock(tmp_path, "quantize") as me, pytest.raises(ConfigError) as refused, \
            output_lock(tmp_path, "build"):
        pass
    message = str(refused.value)
    assert f"PID {os.getpid()}" in message and "`build-engine quantize`" in message and me.since in message
    assert str(tmp_path) in message and not (tmp_path / LOCK_FILE).exists()


def test_a_live_process_keeps_its_lock(tmp_path: Path) -> None:
    with _sleeping_process() as pid:
        text = _lock_text(pid)
        (tmp_path / LOCK_FILE).write_text(text)
        with pytest.raises(ConfigError, match=f"in use by `build-engine build` \\(PID {pid} on "), \
                output_lock(tmp_path, "run"):
            pass
    assert (tmp_path / LOCK_FILE).read_text() == text


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pid = _dead_pid()
    (tmp_path / LOCK_FILE).write_text(_lock_text(pid))
    with output_lock(tmp_path, "profile"):
        holder = LockHolder.parse((tmp_path / LOCK_FILE).read_text())
        assert holder is not None and holder.pid == os.getpid() and holder.command == "profile"
    err = capsys.readouterr().err
    assert "stale lock" in err and f"PID {pid}" in err and "no longer runs" in err
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_honoured(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).write_text(_lock_text(_dead_pid(), host="some-other-host"))
    with pytest.raises(ConfigError, match="on some-other-host"), output_lock(tmp_path, "run"):
        pass
    assert (tmp_path / LOCK_FILE).exists()


def test_an_unreadable_lock_is_refused_not_taken(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).write_text("")
    with pytest.raises(ConfigError, match=r"unreadable lock file.*delete the file"), output_lock(tmp_path, "run"):
        pass
    assert (tmp_path / LOCK_FILE).read_text() == ""


def test_a_lock_from_a_newer_version_with_more_keys_is_still_read() -> None:
    text = json.dumps({"pid": 7, "host": "h", "command": "demo", "since": "s", "argv": ["x"]})
    assert LockHolder.parse(text) == LockHolder(pid=7, host="h", command="demo", since="s")
    assert LockHolder.parse('{"pid": "7"}') is None and LockHolder.parse("[]") is None


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_the_lock_is_released_on_error_and_ctrl_c(tmp_path: Path, error: type[BaseException]) -> None:
    with pytest.raises(error), output_lock(tmp_path, "calibrate"):
        assert (tmp_path / LOCK_FILE).exists()
        raise error
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_taken_from_under_the_holder_is_left_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with output_lock(tmp_path, "build"):
        (tmp_path / LOCK_FILE).write_text(_lock_text(12345, host="elsewhere"))
    assert (tmp_path / LOCK_FILE).exists() and "no longer this run's" in capsys.readouterr().err


def test_claim_creates_missing_folders_and_removes_them_when_nothing_was_written(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    with pytest.raises(ValueError), claim_output_dir(out, "run", parents=True):
        assert (out / LOCK_FILE).is_file()
        raise ValueError
    assert not (tmp_path / "a").exists()
    with claim_output_dir(out, "run", parents=True):
        (out / "model.onnx").write_bytes(b"x")
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]
    with claim_output_dir(tmp_path, "run"):
        pass
    assert tmp_path.is_dir()  # an existing folder is never removed


def test_claim_checks_before_creating_anything(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"), claim_output_dir(tmp_path / "x" / "y", "run"):
        pass
    (tmp_path / "f").write_text("keep")
    with pytest.raises(ConfigError, match="is a file"), claim_output_dir(tmp_path / "f", "run"):
        pass
    with pytest.raises(ConfigError, match="is a folder"), claim_output_file(tmp_path, "evaluate"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_claim_output_file_locks_the_files_folder(tmp_path: Path) -> None:
    with claim_output_file(tmp_path / "report.json", "evaluate"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["command"] == "evaluate"
    assert not (tmp_path / LOCK_FILE).exists()


def test_check_output_file_rules(tmp_path: Path) -> None:
    check_output_file(tmp_path / "new.json")
    (tmp_path / "old.json").write_text("{}")
    check_output_file(tmp_path / "old.json")  # replaced atomically
    check_output_file(tmp_path / "a" / "b.json", parents=True)
    with pytest.raises(ConfigError, match="does not exist"):
        check_output_file(tmp_path / "a" / "b.json")
    with pytest.raises(ConfigError, match="is a folder"):
        check_output_file(tmp_path)
    with pytest.raises(ConfigError, match="is a file"):
        check_output_file(tmp_path / "old.json" / "x.json")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="broken symbolic link"):
        check_output_file(tmp_path / "dangling")
    with pytest.raises(ConfigError, match="broken symbolic link"):
        check_output_dir(tmp_path / "dangling")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "old.json"]


def test_permissions_are_read_where_they_bind(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "old.json").write_text("{}")
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that permission bits do not bind (root); "
                        "tests/meta/test_cli_outputs.py uses a read-only bind mount there")
        with pytest.raises(ConfigError, match="is not writable"):
            check_output_dir(locked)
        with pytest.raises(ConfigError, match="is not writable"):
            check_output_dir(locked / "new")
        with pytest.raises(ConfigError, match="not writable"):
            check_output_file(locked / "old.json")
    finally:
        locked.chmod(0o700)


RACER = """
import sys, time
from pathlib import Path
from builder.cli.lock import output_lock
from calib.errors import ConfigError
folder, go = Path(sys.argv[1]), Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
try:
    with output_lock(folder, "race"):
        print("won", flush=True)
        time.sleep(1.5)
except ConfigError:
    print("lost", flush=True)
"""


@pytest.mark.parametrize("start", ["free", "stale"])
def test_exactly_one_of_several_racing_runs_gets_the_lock(tmp_path: Path, start: str) -> None:
    """Four processes take the lock at the same moment, of a free folder or of one whose holder died."""
    folder, go = tmp_path / "out", tmp_path / "go"
    folder.mkdir()
    if start == "stale":
        (folder / LOCK_FILE).write_text(_lock_text(_dead_pid()))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(folder), str(go)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    time.sleep(1.0)  # let them import and wait
    go.touch()
    results = [r.communicate(timeout=60) for r in racers]
    outcomes = sorted(out.strip() for out, _ in results)
    assert outcomes == ["lost", "lost", "lost", "won"], results
    assert not (folder / LOCK_FILE).exists()
