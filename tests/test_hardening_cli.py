"""Hardening of the command line: interruption, staging folders, disk full, bad sizes, usage errors, bench
options. Each case checks the exit code, exactly one line on stderr, no traceback, and the files left."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

EDGEVIT = [sys.executable, "-m", "edgevit.cli"]
README = Path(__file__).resolve().parents[1] / "README.md"
SHAPE = ["--input-shape", "1,3,32,32"]

# A tiny user module. Under test-only environment variables, set by these tests, the export child patches
# itself at import: SLEEPY_MARKER makes the ONNX converter write its PID there and sleep (a hung converter,
# with the staging folder in place); ENOSPC_AT=replace|manifest makes moving the artifact into place or
# writing the manifest fail with "No space left on device".
TINY = '''
import errno, os, pathlib, sys, time
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).mean((2, 3))


def factory():
    return Tiny()


if "--in-process" in sys.argv and os.environ.get("SLEEPY_MARKER"):
    import edgevit.export.backends.onnx.convert as _onnx

    def _hang(*args, **kwargs):
        pathlib.Path(os.environ["SLEEPY_MARKER"]).write_text(str(os.getpid()))
        time.sleep(600)

    _onnx.convert = _hang

if "--in-process" in sys.argv and os.environ.get("ENOSPC_AT") == "replace":
    _replace = os.replace

    def _full_replace(src, dst, *args, **kwargs):
        if pathlib.Path(src).parent.name.startswith(".edgevit-tmp-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return _replace(src, dst, *args, **kwargs)

    os.replace = _full_replace

if "--in-process" in sys.argv and os.environ.get("ENOSPC_AT") == "manifest":
    _write_text = pathlib.Path.write_text

    def _full_write_text(self, *args, **kwargs):
        if self.name.startswith(".manifest.json.tmp"):
            _write_text(self, "{")  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return _write_text(self, *args, **kwargs)

    pathlib.Path.write_text = _full_write_text
'''


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A working directory holding the tiny module ``tinymod`` (importable from the cwd)."""
    (tmp_path / "tinymod.py").write_text(TINY)
    return tmp_path


def run(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEVIT, *args], check=False, capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def start(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([*EDGEVIT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env={**os.environ, **(env or {})})


def one_line_error(proc: subprocess.CompletedProcess, code: int = 2, match: str | None = None) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    if match is not None:
        assert re.search(match, lines[0]), lines[0]
    return lines[0]


def listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its content; {} if the folder does not exist."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def alive(pid: int) -> bool:
    from edgevit.export.manifest import pid_alive

    return pid_alive(pid)


def wait_for(predicate, timeout: float, step: float = 0.2) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def hung_export(work: Path) -> tuple[subprocess.Popen, int, Path]:
    """``edgevit export`` whose child hangs in the converter, staging folder in place; (parent, child PID, out)."""
    marker, out = work / "child.pid", work / "out"
    parent = start("export", "tinymod:factory", *SHAPE, "--target", "onnx", "--out", str(out), cwd=work,
                   env={"SLEEPY_MARKER": str(marker)})
    assert wait_for(lambda: marker.exists() and marker.read_text(), 300), parent.stderr
    child = int(marker.read_text())
    assert list(out.glob(".edgevit-tmp-*")), "the child hangs with its staging folder in place"
    return parent, child, out


# --- 1 + 2: interruption stops the child; no staging folder is left ------------------------------------

@pytest.mark.parametrize("sig, code, message", [(signal.SIGKILL, -signal.SIGKILL, None),
                                               (signal.SIGTERM, 128 + signal.SIGTERM, "error: terminated"),
                                               (signal.SIGINT, 130, "error: interrupted")])
def test_killing_export_stops_its_child_and_leaves_no_staging(work: Path, sig: int, code: int,
                                                              message: str | None) -> None:
    parent, child, out = hung_export(work)
    parent.send_signal(sig)
    _, stderr = parent.communicate(timeout=60)
    assert parent.returncode == code
    assert wait_for(lambda: not alive(child), 30), "the export child outlived its parent"
    assert not list(out.glob(".edgevit-tmp-*")) and not (out / "manifest.json").exists()
    assert listing(out) == {}  # no staging folder, no artifact, no manifest
    if message is not None:  # the parent ran its cleanup: the folder it created is gone too
        assert stderr.strip() == message and "Traceback" not in stderr
        assert not out.exists()


def test_killed_child_is_an_error_row_and_leaves_no_staging(work: Path) -> None:
    parent, child, out = hung_export(work)
    os.kill(child, signal.SIGTERM)
    stdout, stderr = parent.communicate(timeout=120)
    proc = subprocess.CompletedProcess(parent.args, parent.returncode, stdout, stderr)
    one_line_error(proc, 2)
    assert listing(out) == {} and not out.exists()


def test_child_keeps_its_deadline_without_the_parent(work: Path) -> None:
    """The child of a parent that cannot enforce the timeout stops itself at the deadline (child-side)."""
    marker, out = work / "child.pid", work / "out"
    out.mkdir()
    env = {**os.environ, "SLEEPY_MARKER": str(marker), "EDGEVIT_EXPORT_PARENT": str(os.getpid()),
           "EDGEVIT_EXPORT_DEADLINE": str(time.time() + 20)}
    child = subprocess.Popen([*EDGEVIT, "export", "tinymod:factory", *SHAPE, "--target", "onnx", "--out", str(out),
                              "--in-process"], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    stdout, _ = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM and stdout == ""
    assert listing(out) == {}  # no staging folder, no artifact, no manifest


def test_stale_staging_is_swept_at_the_next_export(work: Path) -> None:
    out = work / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid in ((".edgevit-tmp-dead", dead.pid), (".edgevit-tmp-live", os.getpid())):
        (out / name).mkdir(parents=True)
        (out / name / ".owner").write_text(f"{pid}\n")
        (out / name / "factory.onnx").write_bytes(b"partial")
    proc = run("export", "tinymod:factory", *SHAPE, "--target", "onnx", "--out", str(out), "--in-process", cwd=work)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert set(listing(out)) == {"factory.onnx", "manifest.json", ".edgevit-tmp-live/.owner",
                                 ".edgevit-tmp-live/factory.onnx"}


# --- 3: disk full ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_process", [True, False])
def test_disk_full_placing_the_artifact_leaves_no_folder(work: Path, in_process: bool) -> None:
    out = work / "new" / "out"
    proc = run("export", "tinymod:factory", *SHAPE, "--target", "onnx", "--out", str(out),
               *(["--in-process"] if in_process else []), cwd=work, env={"ENOSPC_AT": "replace"})
    one_line_error(proc, 2, rf"^error: no space left on {re.escape(str(out))}: need about \d+ MB$")
    assert not (work / "new").exists()  # every folder this export created is gone


def test_disk_full_writing_the_manifest_keeps_the_previous_export(work: Path) -> None:
    out = work / "out"
    first = run("export", "tinymod:factory", *SHAPE, "--target", "onnx", "--out", str(out), "--in-process", cwd=work)
    assert first.returncode == 0, first.stderr
    (out / "notes.txt").write_text("mine")
    before = listing(out)
    assert set(before) == {"factory.onnx", "manifest.json", "notes.txt"}
    proc = run("export", "tinymod:factory", "--input-shape", "1,3,48,48", "--target", "onnx", "--out", str(out),
               "--in-process", cwd=work, env={"ENOSPC_AT": "manifest"})
    one_line_error(proc, 2, r"^error: no space left on .*: need about \d+ MB$")
    assert listing(out) == before


# --- 4: input sizes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["export", "deit_tiny", "-t", "onnx"], ["inspect", "deit_tiny", "-t", "onnx"],
                                     ["bench", "--models", "deit_tiny"]])
@pytest.mark.parametrize("size, message", [("0", r"--input-size 0 is not a positive size"),
                                           ("-16", r"--input-size -16 is not a positive size"),
                                           ("65536", r"needs about \d+ GB for one input image; this machine has \d+ GB")])
def test_bad_input_size_is_refused_up_front(tmp_path: Path, command: list[str], size: str, message: str) -> None:
    out = tmp_path / "out"
    out_flag = ["--keep", str(out)] if command[0] == "inspect" else ["--out", str(out)]
    proc = run(*command, "--input-size", size, *out_flag, cwd=tmp_path, timeout=300)
    one_line_error(proc, 2, message)
    assert not out.exists()


# --- 8: usage errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["export", "--bogus"], "No such option: --bogus"),
    (["export"], "Missing argument"),
    (["export", "deit_tiny"], "Missing option '--target'"),
    (["bench", "--runs", "x"], "Invalid value for '--runs'"),
    (["no-such-command"], "No such command"),
])
def test_usage_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    proc = run(*args, cwd=tmp_path, timeout=120)
    one_line_error(proc, 2, re.escape(message))
    assert "Usage:" not in proc.stderr and "╭" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_help_is_unchanged(tmp_path: Path) -> None:
    proc = run("export", "--help", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "Usage:" in proc.stdout and "--target" in proc.stdout and "--input-size" in proc.stdout
    bare = run(cwd=tmp_path, timeout=120)  # no command: the help, as typer prints it
    assert bare.returncode == 2 and bare.stderr == "" and "Usage:" in bare.stdout and "export" in bare.stdout


# --- 9: bench options, checked before any measuring -------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--runs", "3", "--rounds", "10"], r"--runs 3 is fewer than --rounds 10"),
    (["--models", ","], r"--models ',' names no model"),
    (["--timeout", "-1"], r"--timeout must be > 0 seconds"),
    (["--json", "{file}/result.json"], r"--json '.*file/result.json': '.*file' is a file, not a directory"),
    (["--cache", "{file}"], r"--cache '.*file': '.*file' is a file, not a directory"),
])
def test_bench_bad_options_are_one_line_before_measuring(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "file").write_text("a file")
    out = tmp_path / "bench"
    args = [a.replace("{file}", str(tmp_path / "file")) for a in args]
    proc = run("bench", "--models", "deit_tiny", "--input-size", "32", "--no-roofline", *args, "--out", str(out),
               cwd=tmp_path, timeout=300) if args[:1] != ["--models"] else \
        run("bench", *args, "--out", str(out), cwd=tmp_path, timeout=300)
    one_line_error(proc, 2, message)
    assert not out.exists() and (tmp_path / "file").read_text() == "a file"


# --- README -----------------------------------------------------------------------------------------------

def test_readme_states_the_guarantees() -> None:
    text = README.read_text()
    assert "## What edgevit guarantees" in text
    section = text.split("## What edgevit guarantees", 1)[1].split("\n## ", 1)[0]
    assert len(section.strip().splitlines()) <= 15
    for code in ("0", "1", "2"):
        assert re.search(rf"`{code}`", section), f"exit code {code} not named"
    for word in ("manifest", "staging", "child", "before"):
        assert word in section


@pytest.mark.parametrize("verbose", [False, True])
def test_converter_output_only_with_verbose(work: Path, verbose: bool) -> None:
    """The converters' own prints (litert-torch's progress) reach the terminal only with -v."""
    proc = run("export", "tinymod:factory", *SHAPE, "--target", "tflite", "--out", str(work / "out"),
               "--latency-runs", "0", *(["-v"] if verbose else []), cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert ("LiteRT-Torch Convert" in proc.stderr) == verbose, proc.stderr[-1500:]
