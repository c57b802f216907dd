"""Remote devices: the same measurement on another machine, over ssh or adb.

The protocol (version ``worker.PROTOCOL``) is four steps, each a plain file operation or command, so
any transport that can copy files and run a command can carry it:

1. **push** into a fresh remote directory: ``worker.py`` (self-contained: Python 3.9+, numpy and the
   runtime being measured), the artifact (file or directory: ``.onnx``, ``.tflite``, ``.xml`` + ``.bin``,
   ``.mlpackage``), ``inputs.npz`` (the positional inputs as ``arr_0``, ``arr_1``, ...) and
   ``config.json`` (the worker config with paths relative to that directory, plus ``runs``, ``warmup``
   and optional ``budget_s``);
2. **run** ``python3 worker.py run config.json result.json`` in that directory, with a timeout;
3. **pull** ``result.json`` (written atomically by the worker: it exists only when complete). It holds
   ``ok``, ``error``, ``load_ms``, ``first_ms``, ``times_ms``, ``peak_rss_mb``, ``info`` (runtime,
   version, threads, precision as the runtime reports it), ``platform`` and ``profile``;
4. **clean** the remote directory.

A missing ``result.json`` after the command exits (the runtime crashed) or a timeout is recorded
like a local crash or hang. :class:`LoopbackTransport` runs step 2 as a separate local process in
a scratch directory with a clean environment (no PYTHONPATH, so the worker cannot lean on edgevit):
that is how the protocol is tested here. :class:`SshTransport` and :class:`AdbTransport` build the
scp/ssh and adb push/shell/pull command lines for real devices; they are not exercised on this machine.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from edgevit.devices.harness import WORKER, Measurement
from edgevit.errors import EdgevitError

CommandRunner = Callable[[Sequence[str], float], subprocess.CompletedProcess]


def _run(argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s)


class Transport:
    """Copy files to and from a remote directory and run a command in it."""

    python = "python3"

    def make_dir(self) -> str:
        raise NotImplementedError

    def push(self, local: Path, remote_dir: str) -> None:
        raise NotImplementedError

    def execute(self, remote_dir: str, argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess:
        raise NotImplementedError

    def pull(self, remote_dir: str, name: str, local: Path) -> bool:
        """Copy ``remote_dir/name`` to ``local``; False if it does not exist."""
        raise NotImplementedError

    def clean(self, remote_dir: str) -> None:
        raise NotImplementedError


class LoopbackTransport(Transport):
    """The "remote" is a scratch directory here, and the worker a separate process with a clean env."""

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python

    def make_dir(self) -> str:
        return tempfile.mkdtemp(prefix="edgevit-remote-")

    def push(self, local: Path, remote_dir: str) -> None:
        dest = Path(remote_dir) / local.name
        if local.is_dir():
            shutil.copytree(local, dest)
        else:
            shutil.copy2(local, dest)

    def execute(self, remote_dir: str, argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        return subprocess.run(list(argv), cwd=remote_dir, env=env, capture_output=True, text=True, timeout=timeout_s)

    def pull(self, remote_dir: str, name: str, local: Path) -> bool:
        src = Path(remote_dir) / name
        if not src.exists():
            return False
        shutil.copy2(src, local)
        return True

    def clean(self, remote_dir: str) -> None:
        shutil.rmtree(remote_dir, ignore_errors=True)


@dataclass
class SshTransport(Transport):
    """``host`` as ssh understands it (user@host, or a Host alias from ~/.ssh/config)."""

    host: str
    base: str = "/tmp"
    python: str = "python3"
    runner: CommandRunner = _run

    def make_dir(self) -> str:
        path = f"{self.base}/edgevit-{uuid.uuid4().hex[:12]}"
        self._check(self.runner(["ssh", self.host, f"mkdir -p {shlex.quote(path)}"], 60), "mkdir")
        return path

    def push(self, local: Path, remote_dir: str) -> None:
        self._check(self.runner(["scp", "-q", "-r", str(local), f"{self.host}:{remote_dir}/"], 600), "scp push")

    def execute(self, remote_dir: str, argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess:
        command = f"cd {shlex.quote(remote_dir)} && {shlex.join(argv)}"
        return self.runner(["ssh", self.host, command], timeout_s)

    def pull(self, remote_dir: str, name: str, local: Path) -> bool:
        return self.runner(["scp", "-q", f"{self.host}:{remote_dir}/{name}", str(local)], 120).returncode == 0

    def clean(self, remote_dir: str) -> None:
        self.runner(["ssh", self.host, f"rm -rf {shlex.quote(remote_dir)}"], 60)

    @staticmethod
    def _check(proc: subprocess.CompletedProcess, what: str) -> None:
        if proc.returncode != 0:
            raise EdgevitError(f"{what} failed: {(proc.stderr or '').strip().splitlines()[-1:] or proc.returncode}")


@dataclass
class AdbTransport(Transport):
    """An Android device over adb; the worker runs under a Python on the device (e.g. Termux's)."""

    serial: str | None = None
    base: str = "/data/local/tmp"
    python: str = "python3"
    runner: CommandRunner = _run

    def _adb(self, *args: str) -> list[str]:
        return ["adb", *(["-s", self.serial] if self.serial else []), *args]

    def make_dir(self) -> str:
        path = f"{self.base}/edgevit-{uuid.uuid4().hex[:12]}"
        SshTransport._check(self.runner(self._adb("shell", f"mkdir -p {shlex.quote(path)}"), 60), "adb mkdir")
        return path

    def push(self, local: Path, remote_dir: str) -> None:
        SshTransport._check(self.runner(self._adb("push", str(local), f"{remote_dir}/"), 600), "adb push")

    def execute(self, remote_dir: str, argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess:
        return self.runner(self._adb("shell", f"cd {shlex.quote(remote_dir)} && {shlex.join(argv)}"), timeout_s)

    def pull(self, remote_dir: str, name: str, local: Path) -> bool:
        return self.runner(self._adb("pull", f"{remote_dir}/{name}", str(local)), 120).returncode == 0

    def clean(self, remote_dir: str) -> None:
        self.runner(self._adb("shell", f"rm -rf {shlex.quote(remote_dir)}"), 60)


def measure_remote(transport: Transport, config: dict[str, Any], artifact: Path, inputs: Path,
                   runs: int = 20, warmup: int = 3, budget_s: float | None = None, timeout_s: float = 600,
                   label: str = "", meta: dict[str, Any] | None = None) -> Measurement:
    """Steps 1-4 of the protocol for one configuration; the result as a (one-round) Measurement."""
    result = Measurement(label or config.get("runtime", "?"), dict(meta or {}))
    remote = transport.make_dir()
    try:
        with tempfile.TemporaryDirectory(prefix="edgevit-push-") as tmp:
            cfg = {**config, "artifact": artifact.name, "inputs": "inputs.npz", "runs": runs, "warmup": warmup,
                   "budget_s": budget_s}
            (Path(tmp) / "config.json").write_text(json.dumps(cfg))
            shutil.copy2(inputs, Path(tmp) / "inputs.npz")
            for local in (WORKER, artifact, *_companions(artifact), Path(tmp) / "inputs.npz", Path(tmp) / "config.json"):
                transport.push(Path(local), remote)
            try:
                proc = transport.execute(remote, [transport.python, "worker.py", "run", "config.json", "result.json"],
                                         timeout_s)
            except subprocess.TimeoutExpired:
                result.status, result.detail = "timeout", f"no result within {timeout_s:.0f} s"
                return result
            out = Path(tmp) / "result.json"
            if not transport.pull(remote, "result.json", out):
                tail = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()][-1:]
                code = proc.returncode
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                result.status = "crashed"
                result.detail = f"worker {how}, no result.json" + (f"; {tail[0][:200]}" if tail else "")
                return result
            return _from_result(result, json.loads(out.read_text()))
    finally:
        transport.clean(remote)


def _companions(artifact: Path) -> list[Path]:
    """Files an artifact needs beside it (OpenVINO's .bin next to the .xml)."""
    weights = artifact.with_suffix(".bin")
    return [weights] if artifact.suffix == ".xml" and weights.exists() else []


def _from_result(result: Measurement, data: dict[str, Any]) -> Measurement:
    if not data.get("ok"):
        result.status, result.detail = "error", data.get("error", "unknown error")
        return result
    result.status = "ok"
    result.load_ms, result.first_ms = data["load_ms"], data["first_ms"]
    result.rounds = [list(data["times_ms"])]
    result.info, result.platform = data["info"], data["platform"]
    result.peak_rss_mb, result.profile = data["peak_rss_mb"], data.get("profile", [])
    return result
