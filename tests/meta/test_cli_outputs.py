"""Meta: every subcommand that writes checks its output location and lock before any work.

The table below names, for every subcommand in builder/cli/registry.py, the flag through which it writes (a
new subcommand fails :func:`test_every_subcommand_is_listed` until it is added). Each writing subcommand is run
with tiny inputs against an output that is a file where a folder belongs (or a folder where a file belongs), a
folder without write permission and a missing parent, and must exit 2 naming the path, print no traceback and
start no work: the functions where each command's work begins are tripwires that fail the test when reached.
Commands that write into a folder must also refuse a folder locked by a live process, naming the holder.

Read-only folders as root: permission bits do not bind root, so the folder is bind-mounted read-only in a
private mount namespace (``unshare --mount``; the kernel then refuses every write, root's included). Where
that is not allowed either (a container without CAP_SYS_ADMIN), the read-only case alone runs with
``os.access`` answering "not writable" for that folder: it then tests that every command calls the check,
not that the check reads the permissions (tests/unit/test_lock.py covers that part wherever it can).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from builder.cli.lock import LOCK_FILE
from builder.cli.main import main
from builder.cli.registry import SUBCOMMANDS

REPO_ROOT = Path(__file__).resolve().parents[2]

# Where each command's work begins; reaching one before the output check is a failure.
TRIPWIRES = (
    ("builder.graph.load", "load_model"),
    ("builder.intake.prepare", "prepare_model"),
    ("builder.intake.minilm", "ensure_minilm_onnx"),
    ("calib.collect", "collect"),
    ("builder.engine.build", "build_engine_dir"),
    ("builder.serve.export", "export_triton"),
    ("builder.profile.sweep", "run_sweep"),
    ("builder.evaluate.tokenizer", "model_text_encoder"),
)


@dataclass(frozen=True)
class Inputs:
    """Tiny inputs every command accepts: a toy ONNX model (its tokenizer beside it) and a scratch folder."""

    model: Path
    scratch: Path


Kind = Literal["folder", "file"]


@dataclass(frozen=True)
class Case:
    """How ``command`` is pointed at an output: a folder it writes into, or one file it writes."""

    command: str
    kind: Kind
    argv: Callable[[Inputs, Path], list[str]]
    locks: bool  # holds the lock of the output folder (of a file: of the file's folder)
    locked: Callable[[Path], Path] | None = None  # the folder it locks, when not the output (or the file's) folder

    def lock_folder(self, output: Path) -> Path:
        if self.locked is not None:
            return self.locked(output)
        return output if self.kind == "folder" else output.parent


def _m(i: Inputs) -> str:
    return str(i.model)


CASES: tuple[Case, ...] = (
    Case("run", "folder", lambda i, o: [_m(i), "-o", str(o), "--no-progress"], locks=True),
    Case("demo", "folder", lambda i, o: ["demo", "--engines", str(o), "--recipes", "fp16", "--no-build"], locks=True,
         locked=lambda o: o / "minilm-fp16"),  # one lock per recipe folder
    Case("demo", "file", lambda i, o: ["demo", "--json", str(o), "--engines", str(i.scratch / "engines")],
         locks=False),
    Case("analyze", "file", lambda i, o: ["analyze", _m(i), "--json", str(o)], locks=False),
    Case("calibrate", "folder", lambda i, o: ["calibrate", _m(i), "--samples", "8", "--no-progress", "-o", str(o)],
         locks=True),
    Case("quantize", "folder", lambda i, o: ["quantize", _m(i), "--statistics", str(i.scratch), "-o", str(o)],
         locks=True),
    Case("build", "folder", lambda i, o: ["build", _m(i), "-o", str(o), "--backend", "tensorrt-rtx", "--arch", "sm86",
                                          "--opt-level", "0"], locks=True),
    Case("export-triton", "folder", lambda i, o: ["export-triton", str(i.scratch), "--repo", str(o)], locks=True),
    Case("profile", "folder", lambda i, o: ["profile", _m(i), "-o", str(o), "--iterations", "1"], locks=True),
    Case("evaluate", "file", lambda i, o: ["evaluate", _m(i), "--reference", _m(i), "-o", str(o)], locks=True),
    Case("sweep", "folder", lambda i, o: ["sweep", _m(i), "--samples", "8", "--no-evaluate", "--no-progress", "-o",
                                          str(o)], locks=True),
    Case("search", "folder", lambda i, o: ["search", _m(i), "--budget", "cosine>=0.999", "--samples", "8",
                                           "--no-progress", "-o", str(o)], locks=True),
    Case("verify-accumulator", "file",
         lambda i, o: ["verify-accumulator", _m(i), "--accumulator-bits", "32", "--json", str(o)], locks=False),
)
WRITES_NOTHING: frozenset[str] = frozenset()  # subcommands without any output (none today)


def _case_id(case: Case) -> str:
    return f"{case.command}-{case.kind}"


# ---------------------------------------------------------------------------------------------------------------
# running a command in process, with the tripwires armed


class WorkStarted(BaseException):
    """Raised by a tripwire; a BaseException so that no ``except Exception`` in the command can swallow it."""


@dataclass
class Result:
    code: int | None  # None: an exception escaped main()
    out: str
    err: str
    work: list[str] = field(default_factory=list)  # tripwires reached


_REACHED: list[list[str]] = []  # the armed runs' records (innermost last); empty: the tripwires pass calls on


def _wire(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def wire(*args: Any, **kwargs: Any) -> Any:
        if not _REACHED:  # a module imported during an armed run may keep this wire: it must stay harmless
            return original(*args, **kwargs)
        _REACHED[-1].append(name)
        raise WorkStarted(f"{name} was called before the output check")

    return wire


@contextlib.contextmanager
def _tripwires(reached: list[str]) -> Iterator[None]:
    modules = [(importlib.import_module(module), attr) for module, attr in TRIPWIRES]  # all imported first
    saved = []
    for module, attr in modules:
        assert hasattr(module, attr), f"tripwire {module.__name__}.{attr} is gone: update TRIPWIRES"
        saved.append((module, attr, getattr(module, attr)))
        setattr(module, attr, _wire(f"{module.__name__}.{attr}", getattr(module, attr)))
    _REACHED.append(reached)
    try:
        yield
    finally:
        _REACHED.pop()
        for module, attr, original in saved:
            setattr(module, attr, original)


def run_cli(argv: list[str]) -> Result:
    """``build-engine ARGV`` in this process with the tripwires armed; an escaping exception is recorded as its
    traceback on stderr, as the console script would print it."""
    out, err = io.StringIO(), io.StringIO()
    reached: list[str] = []
    code: int | None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _tripwires(reached):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
        except BaseException:  # any escape is what this test looks for
            code = None
            err.write(traceback.format_exc())
    return Result(code=code, out=out.getvalue(), err=err.getvalue(), work=reached)


# ---------------------------------------------------------------------------------------------------------------
# read-only folders


@functools.cache
def _read_only_mechanism() -> Literal["chmod", "bind", "access"]:
    """How to make a folder unwritable for this process: permission bits, a read-only bind mount, or neither."""
    if os.geteuid() != 0:
        return "chmod"
    unshare = shutil.which("unshare")
    if unshare is not None:
        probe = Path(__file__).parent  # exists; the mount is private to the probe's namespace and gone after it
        proc = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c",
                               'mount --bind -o ro "$0" "$0" && ! touch "$0/.probe" 2>/dev/null', str(probe)],
                              capture_output=True, timeout=60, check=False)
        if proc.returncode == 0:
            return "bind"
    return "access"


def _run_read_only(argv: list[str], folder: Path) -> Result:
    """``build-engine ARGV`` with ``folder`` unwritable (see the module docstring)."""
    mechanism = _read_only_mechanism()
    if mechanism == "chmod":
        folder.chmod(0o555)
        try:
            return run_cli(argv)
        finally:
            folder.chmod(0o755)
    if mechanism == "bind":
        script = ("import json, sys; from tests.meta.test_cli_outputs import run_cli; "
                  "print(json.dumps(vars(run_cli(json.loads(sys.argv[1])))))")
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               'mount --bind -o ro "$0" "$0" && exec "$1" -c "$2" "$3"',
                               str(folder), sys.executable, script, json.dumps(argv)],
                              capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, check=False)
        assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
        return Result(**json.loads(proc.stdout.strip().splitlines()[-1]))
    real_access = os.access

    def access(path: Any, mode: int, **kwargs: Any) -> bool:
        inside = Path(path).absolute().is_relative_to(folder.absolute())
        return False if inside and mode & os.W_OK else real_access(path, mode, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "access", access)
        return run_cli(argv)


# ---------------------------------------------------------------------------------------------------------------
# fixtures and tests


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    import onnx

    from builder.intake.minilm import tokenizer_json_path
    from tests.toygraphs import bert_block_model

    folder = tmp_path_factory.mktemp("cli-outputs")
    model = folder / "toy.onnx"
    onnx.save(bert_block_model(layers=1, hidden=48), str(model))  # MiniLM's vocabulary, found beside the model:
    shutil.copyfile(tokenizer_json_path(), folder / "tokenizer.json")
    return Inputs(model=model, scratch=folder)


def test_every_subcommand_is_listed() -> None:
    listed = {case.command for case in CASES}
    assert not listed & WRITES_NOTHING
    missing = set(SUBCOMMANDS) - listed - WRITES_NOTHING
    assert not missing, f"add the output flag of {sorted(missing)} to CASES (or to WRITES_NOTHING)"
    assert listed <= set(SUBCOMMANDS), f"CASES names unknown subcommands {sorted(listed - set(SUBCOMMANDS))}"


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _assert_refused(result: Result, path: Path, reason: str) -> None:
    assert "Traceback" not in result.err, result.err
    assert not result.work, f"work started before the output check: {result.work}"
    assert result.code == 2, (result.code, result.err)
    assert str(path) in result.err and reason in result.err, result.err


BAD_OUTPUTS = [(case, bad) for case in CASES for bad in ("file_in_the_way", "folder_in_the_way", "missing_parent")
               if not (bad == "folder_in_the_way" and case.kind == "folder")]  # an output folder may exist


@pytest.mark.parametrize(("case", "bad"), BAD_OUTPUTS, ids=[f"{_case_id(c)}-{b}" for c, b in BAD_OUTPUTS])
def test_a_bad_output_is_refused_before_any_work(case: Case, bad: str, inputs: Inputs, tmp_path: Path) -> None:
    if bad == "file_in_the_way":  # a file where the output folder (or the output file's folder) belongs
        blocker = tmp_path / "a_file"
        blocker.write_text("keep me")
        output, shown, reason = (blocker, blocker, "is a file") if case.kind == "folder" else \
            (blocker / "report.json", blocker / "report.json", "is a file")
    elif bad == "folder_in_the_way":  # a folder where the output file belongs
        output = shown = tmp_path / "report.json"
        output.mkdir()
        reason = "is a folder"
    else:
        output = shown = tmp_path / "no" / "such" / ("out" if case.kind == "folder" else "report.json")
        reason = "does not exist"
    before = _snapshot(tmp_path)
    _assert_refused(run_cli(case.argv(inputs, output)), shown, reason)
    assert _snapshot(tmp_path) == before  # nothing created, nothing replaced


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_an_unwritable_folder_is_refused_before_any_work(case: Case, inputs: Inputs, tmp_path: Path) -> None:
    locked = tmp_path / "read_only"
    locked.mkdir()
    output = locked if case.kind == "folder" else locked / "report.json"
    result = _run_read_only(case.argv(inputs, output), locked)
    _assert_refused(result, output, "not writable")
    assert not list(locked.iterdir())


@contextlib.contextmanager
def _sleeping_process() -> Iterator[int]:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield child.pid
    finally:
        child.kill()
        child.wait()


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    return int(child.stdout)


def _write_lock(folder: Path, pid: int, command: str = "calibrate") -> str:
    text = json.dumps({"pid": pid, "host": socket.gethostname(), "command": command,
                       "since": "2031-01-02T03:04:05+00:00"})
    (folder / LOCK_FILE).write_text(text)
    return text


@pytest.mark.parametrize("case", [c for c in CASES if c.locks], ids=_case_id)
def test_a_folder_held_by_a_live_run_is_refused_naming_the_holder(case: Case, inputs: Inputs, tmp_path: Path) -> None:
    output = tmp_path / "held" if case.kind == "folder" else tmp_path / "held" / "report.json"
    folder = case.lock_folder(output)
    folder.mkdir(parents=True)
    with _sleeping_process() as pid:
        text = _write_lock(folder, pid)
        result = run_cli(case.argv(inputs, output))
    assert "Traceback" not in result.err, result.err
    assert not result.work, f"work started in a locked folder: {result.work}"
    assert result.code == 2, result.err
    assert f"PID {pid}" in result.err and "build-engine calibrate" in result.err, result.err
    assert "2031-01-02T03:04:05" in result.err and str(folder) in result.err
    assert (folder / LOCK_FILE).read_text() == text  # the holder's lock is left alone
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()] == [
        (folder / LOCK_FILE).relative_to(tmp_path)]  # nothing written


def test_a_stale_lock_is_taken_over_and_released(inputs: Inputs, tmp_path: Path) -> None:
    folder = tmp_path / "stale"
    folder.mkdir()
    pid = _dead_pid()
    _write_lock(folder, pid, command="run")
    result = run_cli_unarmed(["calibrate", str(inputs.model), "--samples", "8", "--no-progress", "-o", str(folder)])
    assert result.code == 0, result.err
    assert "stale lock" in result.err and f"PID {pid}" in result.err and "build-engine run" in result.err
    assert (folder / "statistics.npz").is_file() and not (folder / LOCK_FILE).exists()


def test_run_releases_its_lock_on_ctrl_c_and_says_when_it_resumes(inputs: Inputs, tmp_path: Path) -> None:
    """Ctrl-C during calibration (after the checkpoint of batch 4 of 6) releases the lock; the next one-shot
    resumes from the checkpoint and says so, naming --fresh."""
    import tqdm

    folder = tmp_path / "out"
    held_at_interrupt: list[bool] = []

    class InterruptedBar(tqdm.tqdm):  # type: ignore[type-arg]  # the user presses Ctrl-C at batch 5
        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            if self.n >= 5:
                held_at_interrupt.append((folder / LOCK_FILE).is_file())
                raise KeyboardInterrupt
            return shown

    argv = [str(inputs.model), "--samples", "12", "--batch-size", "2", "--no-build", "--no-evaluate", "-o",
            str(folder)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tqdm, "tqdm", InterruptedBar)
        interrupted = run_cli_unarmed(argv)
    assert interrupted.code == 130, interrupted.err
    assert held_at_interrupt == [True]
    assert (folder / "statistics.npz").is_file() and not (folder / LOCK_FILE).exists()
    resumed = run_cli_unarmed([*argv, "--no-progress"])
    assert resumed.code == 0, resumed.err
    line = next(line for line in resumed.out.splitlines() if "calibrate" in line)
    assert f"resumed from {folder / 'statistics.npz'} after 4 of 6 batches" in line and "--fresh" in line, line
    again = run_cli_unarmed([*argv, "--no-progress"])
    line = next(line for line in again.out.splitlines() if "calibrate" in line)
    assert "reused" in line and "--fresh" in line, line


def run_cli_unarmed(argv: list[str]) -> Result:
    """``build-engine ARGV`` in this process, doing its real work."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return Result(code=code, out=out.getvalue(), err=err.getvalue())


READS_A_MODEL = tuple(c for c in CASES if c.command not in ("demo", "export-triton"))


@pytest.mark.parametrize("case", READS_A_MODEL, ids=_case_id)
def test_a_file_that_is_not_onnx_is_refused_naming_it(case: Case, inputs: Inputs, tmp_path: Path) -> None:
    """Every command that reads a model, given a file that is not ONNX (tokenizer beside it), exits 3 naming the
    file, without a traceback (the text encoder once parsed it first and let protobuf's DecodeError escape)."""
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(bytes(range(256)) * 20)
    shutil.copyfile(inputs.model.parent / "tokenizer.json", tmp_path / "tokenizer.json")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(case.argv(Inputs(model=garbage, scratch=inputs.scratch), tmp_path / "out"))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
        except BaseException:
            code = None
            err.write(traceback.format_exc())
    assert "Traceback" not in err.getvalue(), err.getvalue()
    assert code == 3 and str(garbage) in err.getvalue(), (code, err.getvalue())
