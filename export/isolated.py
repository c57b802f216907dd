"""Exports in a child process: a converter that crashes or hangs costs one row, not the whole run.

The child is ``edgevit export MODEL --target T --out DIR --in-process``, which prints its manifest as
JSON on stdout (converters' own prints go to stderr). Its options come from the parent, checked there
once, as an :class:`~edgevit.export.options.ExportOptions` in JSON (the environment variable
``EDGEVIT_EXPORT_OPTIONS``: :func:`take_child_options`); without it the child reads its command-line flags
and checks them. Used by ``edgevit export``, ``edgevit inspect`` and ``edgevit bench``.

No child outlives its export: the parent stops it (SIGTERM, then SIGKILL) on timeout, Ctrl-C or SIGTERM;
the child (:func:`guard_child`) dies with its parent (PR_SET_PDEATHSIG, plus a watchdog thread) and keeps
the deadline on its own. SIGTERM unwinds like an exception, so staging folders are removed on the way out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from edgevit.export.options import ExportOptions

TARGET_TIMEOUT_S = 1800
GRACE_S = 10.0  # a child told to stop (SIGTERM) gets this long to clean up before SIGKILL
PARENT_ENV = "EDGEVIT_EXPORT_PARENT"  # set for the child: the PID it must not outlive
DEADLINE_ENV = "EDGEVIT_EXPORT_DEADLINE"  # set for the child: epoch seconds it must be done by
OPTIONS_ENV = "EDGEVIT_EXPORT_OPTIONS"  # set for the child: its ExportOptions as JSON, checked by the parent
_PR_SET_PDEATHSIG = 1
_parent_pid: int | None = None  # in an export child: the parent's PID
_stopping: str | None = None  # in an export child: why the watchdog is stopping it


def export_command(model: str, target: str, out: Path, flags: Sequence[str] = ()) -> list[str]:
    """The export child's command line (its options travel as JSON, see :func:`export_in_child`)."""
    return [sys.executable, "-m", "edgevit.cli", "export", model, "--target", target, "--out", str(out),
            "--in-process", *flags]


def export_in_child(model: str, target: str, out: Path, options: ExportOptions,
                    timeout_s: float = TARGET_TIMEOUT_S, echo_stderr: bool = False,
                    detached: bool = False) -> dict[str, Any]:
    """The child's manifest (plus ``artifact_path``), or an error row ``{"status": "error", ...}``.

    ``options`` are the parent's, already checked (:meth:`ExportOptions.check`): the child gets them as
    JSON and does not check them again. ``echo_stderr`` copies the child's stderr (the converters' output
    with ``verbose``) to ours. ``detached``: the child gets its own session, so a Ctrl-C at the terminal reaches
    only us (``edgevit sweep`` lets running cells finish); it still dies with us and keeps its deadline."""
    cmd, env = export_command(model, target, out), {OPTIONS_ENV: options.to_json()}
    return run_export_child(cmd, model, target, timeout_s, echo_stderr, env, detached=detached)


def run_export_child(cmd: list[str], model: str, target: str, timeout_s: float = TARGET_TIMEOUT_S,
                     echo_stderr: bool = False, env: Mapping[str, str] | None = None,
                     detached: bool = False) -> dict[str, Any]:
    """Run one export child; on timeout, Ctrl-C or SIGTERM here it is stopped (SIGTERM, then SIGKILL)
    before this returns or re-raises, so no child outlives the export and its staging folder goes too.
    ``env`` is added to the child's environment."""
    env = {k: v for k, v in os.environ.items() if k != OPTIONS_ENV} | dict(env or {}) | {
        PARENT_ENV: str(os.getpid()), DEADLINE_ENV: f"{time.time() + timeout_s:.3f}"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            stdin=subprocess.DEVNULL, start_new_session=detached)
    with _RUNNING_LOCK:
        _RUNNING.add(proc)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_child(proc)
        return error_row(model, target, f"timed out after {timeout_s:.0f} s")
    except BaseException:  # KeyboardInterrupt, SystemExit (SIGTERM): the child goes with us
        stop_child(proc)
        raise
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard(proc)
    proc = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if echo_stderr:
        sys.stderr.write(stderr)
    try:
        return json.loads(proc.stdout)[0]
    except (json.JSONDecodeError, IndexError, KeyError):
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        reason = (errors or lines or [f"exited with code {proc.returncode}"])[-1]
        if proc.returncode < 0:
            reason = f"converter process killed by signal {-proc.returncode}"
        elif proc.returncode == 128 + signal.SIGTERM and reason in ("error: terminated", "terminated"):
            reason = "converter process terminated (SIGTERM)"
        return error_row(model, target, reason.removeprefix("error: "))


# Children started by run_export_child and not yet reaped, from any thread: when several export in threads
# (edgevit check --jobs), an interrupt reaches only the main thread, which stops them all through this.
_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()


def terminate_running_children() -> int:
    """SIGTERM every export child still running (each cleans its staging folder; the thread waiting on it then
    returns its error row); how many were signalled."""
    with _RUNNING_LOCK:
        running = [p for p in _RUNNING if p.poll() is None]
    for proc in running:
        proc.terminate()
    return len(running)


def error_row(model: str, target: str, reason: str) -> dict[str, Any]:
    return {"status": "error", "model": {"name": model}, "target": target, "error": reason}


def stop_child(proc: subprocess.Popen, grace_s: float = GRACE_S) -> None:
    """SIGTERM (the child cleans its staging folder), then SIGKILL after ``grace_s``; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.communicate(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            proc.kill()
        except BaseException:  # a second Ctrl-C: no more grace
            proc.kill()
            proc.wait()
            raise
    proc.communicate()


# --- the child's side ---------------------------------------------------------------------------------

class Terminated(SystemExit):
    """SIGTERM, raised in the main thread: ``finally`` blocks run, so staging folders are removed."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


def install_sigterm_handler() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


def guard_child() -> None:
    """In an export child (started by :func:`run_export_child`): die with the parent and keep the deadline.

    SIGTERM becomes SystemExit; on Linux the kernel sends SIGTERM when the parent dies (PR_SET_PDEATHSIG);
    a watchdog thread also polls the parent's PID and the deadline (so the timeout holds without the
    parent), sends SIGTERM to this process, and exits hard if cleanup takes longer than ``GRACE_S``.
    Outside an export child (no environment from the parent) this does nothing.
    """
    global _parent_pid
    parent = os.environ.pop(PARENT_ENV, None)
    deadline_text = os.environ.pop(DEADLINE_ENV, None)
    if parent is None or not parent.isdigit():
        return
    _parent_pid = int(parent)
    try:
        deadline = float(deadline_text) if deadline_text else None
    except ValueError:
        deadline = None
    install_sigterm_handler()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still notices
    if os.getppid() != _parent_pid:  # the parent died before prctl: nothing done yet, nothing to clean
        os._exit(128 + signal.SIGTERM)
    threading.Thread(target=_watchdog, args=(_parent_pid, deadline), name="edgevit-export-watchdog",
                     daemon=True).start()


def _watchdog(parent: int, deadline: float | None, poll_s: float = 0.5) -> None:
    global _stopping
    while True:
        if os.getppid() != parent:
            _stopping = "the parent process is gone"
        elif deadline is not None and time.time() > deadline:
            _stopping = "past the export deadline"
        if _stopping:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(GRACE_S)
            os._exit(128 + signal.SIGTERM)  # stuck in native code: give up on cleanup (the next export sweeps)
        time.sleep(poll_s)


def take_child_options() -> ExportOptions | None:
    """In an export child: the options the parent checked and sent (removed from the environment, so the
    converters' own processes do not see them); None when started without them (flags on the command line)."""
    text = os.environ.pop(OPTIONS_ENV, None)
    return ExportOptions.from_json(text) if text else None


class StdoutToStderr:
    """Send everything written to fd 1 (converters print from C++ too) to stderr, so stdout stays JSON."""

    def __enter__(self) -> None:
        sys.stdout.flush()
        self._saved = os.dup(1)
        os.dup2(2, 1)

    def __exit__(self, *args: object) -> None:
        sys.stdout.flush()
        os.dup2(self._saved, 1)
        os.close(self._saved)


def check_parent_alive() -> None:
    """In an export child whose parent died (or whose deadline passed): stop before writing anything more."""
    if _parent_pid is not None and (_stopping or os.getppid() != _parent_pid):
        raise Terminated(128 + signal.SIGTERM)
