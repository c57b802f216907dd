"""Remote devices: the same measurement on another machine, over ssh or adb.

A remote is named ``ssh:[user@]host`` (a host or an alias from ~/.ssh/config), ``ssh://[user@]host[:port]``,
``adb:SERIAL`` (``adb:`` alone: the only attached device), or by a name from the devices file
(``devices/inventory.py``). The protocol needs nothing on the device but a Python 3.9+ with numpy and the
runtimes to measure, ``sh`` and (over ssh) ``tar``:

1. **open**: make a fresh directory (``WORKDIR/edgevit-<random>``), push ``worker.py`` (the bundled worker,
   ``devices/worker_bundle.py``, self-contained: standard library + numpy + the runtime it measures) and
   run ``python worker.py probe`` there: its
   answer (CPU, flags, runtimes, providers, OpenVINO devices, NPU/GPU nodes) decides the devices table
   of that machine, with the same probes as here (``devices/table.py``);
2. **push** the artifacts and the inputs of a model (and, for PyTorch eager, edgevit's own source as a
   zip: the model code);
3. **measure**: one ``python worker.py serve`` per configuration, started over ssh/adb, its stdin/stdout
   carried by the connection: the harness speaks the same JSON lines to it as to a local worker, so the
   protocol (load, first inference, warm-up, interleaved rounds, timeouts) is the local one. A worker
   whose connection closes (the harness timed it out, was interrupted or lost the network) exits at
   once: the end of its stdin ends it;
4. **close**: kill any worker still alive (their pids are recorded in the directory) and remove the
   directory, whatever happened before.

Every failure becomes a :class:`RemoteError` with a one-line reason and a kind (``unreachable``,
``auth-failed``, ``no-python``, ``disk-full``, ``lost``, ``error``); a worker that dies is explained
from its exit status (SIGKILL: the device's out-of-memory killer kills this way).
"""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import signal
import subprocess
import tarfile
import tempfile
import uuid
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from edgevit.devices.harness import WorkerProcess
from edgevit.devices.worker_bundle import worker_file
from edgevit.errors import EdgevitError

EXIT_MARK = "edgevit-worker-exit:"  # the remote shell's last stderr line: the worker's exit status
EDGEVIT_ZIP = "edgevit-src.zip"


class RemoteError(EdgevitError):
    """A remote step failed; ``kind`` names the failure for the rows, the message is one line."""

    exit_code = 1

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# --- naming a remote ----------------------------------------------------------------------------

@dataclass(frozen=True)
class RemoteSpec:
    """One remote machine and how to use it (from ``--remote`` or the devices file)."""

    name: str  # how rows and reports name it: the devices-file name, else the address
    kind: str  # ssh | adb
    host: str  # ssh destination ([user@]host or an alias) / adb serial ("" = the only device)
    port: int | None = None
    python: str = "python3"
    threads: int | None = None
    devices: str | None = None  # the device rows to measure there (default: the bench's --device)
    workdir: str | None = None  # where the run's directory is made (ssh: /tmp, adb: /data/local/tmp)
    ssh_config: str | None = None  # an ssh_config file for this remote (ssh -F)

    @property
    def address(self) -> str:
        if self.kind == "adb":
            return f"adb:{self.host}"
        if self.kind == "loopback":
            return "loopback"
        user, at, host = self.host.rpartition("@")
        host = f"[{host}]" if ":" in host else host  # IPv6: only the URL form can carry it
        if self.port or host.startswith("["):
            return f"ssh://{user}{at}{host}" + (f":{self.port}" if self.port else "")
        return f"ssh:{self.host}"


_NAME = r"[A-Za-z0-9_][A-Za-z0-9._-]*"
_SSH_HOST = re.compile(rf"^(?:{_NAME}@)?{_NAME}$")
_SSH_URL = re.compile(rf"^ssh://(?:(?P<user>{_NAME})@)?(?P<host>{_NAME}|\[[0-9A-Fa-f:.]+\])(?::(?P<port>\d+))?/?$")
_ADB_SERIAL = re.compile(r"^[A-Za-z0-9._:-]*$")
USAGE = "use ssh:[user@]host, ssh://[user@]host[:port], adb:SERIAL or a name from the devices file"


def parse_remote(text: str, python: str | None = None) -> RemoteSpec:
    """A ``--remote`` address as a RemoteSpec; a one-line EdgevitError (exit 2) when it is malformed."""
    text = text.strip()
    if text.startswith("ssh://"):
        match = _SSH_URL.match(text)
        if not match:
            raise EdgevitError(f"--remote '{text}': not an ssh URL; {USAGE}")
        host = (f"{match['user']}@" if match["user"] else "") + match["host"].strip("[]")
        port = int(match["port"]) if match["port"] else None
        if port is not None and not 0 < port < 65536:
            raise EdgevitError(f"--remote '{text}': port {port} is not in 1..65535")
        spec = RemoteSpec(text, "ssh", host, port)
    elif text.startswith("ssh:"):
        host = text[4:]
        if ":" in host:
            raise EdgevitError(f"--remote '{text}': give a port as ssh://[user@]host:port")
        if not _SSH_HOST.match(host):
            raise EdgevitError(f"--remote '{text}': '{host}' is not a host name, user@host or ssh_config alias")
        spec = RemoteSpec(text, "ssh", host)
    elif text.startswith("adb:"):
        serial = text[4:]
        if not _ADB_SERIAL.match(serial) or serial.startswith("-"):
            raise EdgevitError(f"--remote '{text}': '{serial}' is not an adb serial (see 'adb devices')")
        spec = RemoteSpec(text, "adb", serial)
    else:
        raise EdgevitError(f"--remote '{text}': unknown remote; {USAGE}")
    return replace(spec, python=python) if python else spec


def resolve_remote(text: str, named: dict[str, RemoteSpec], python: str | None = None) -> RemoteSpec:
    """A devices-file name or an address; ``python`` (``--remote-python``) overrides the file's."""
    text = text.strip()
    if not text:
        raise EdgevitError(f"--remote is empty; {USAGE}")
    if text in named:
        return replace(named[text], python=python) if python else named[text]
    if ":" not in text:
        known = f" (the devices file names: {', '.join(named)})" if named else " (no devices file found)"
        raise EdgevitError(f"--remote '{text}': no device of that name{known}; {USAGE}")
    return parse_remote(text, python)


# --- transports: run a shell command there, copy files there ------------------------------------

Runner = Callable[..., subprocess.CompletedProcess]


def _run(argv: list[str], timeout_s: float, input: bytes | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, input=input, capture_output=True, timeout=timeout_s)
    except FileNotFoundError:
        raise RemoteError("error", f"'{argv[0]}' is not installed on this machine") from None
    except subprocess.TimeoutExpired:
        raise RemoteError("unreachable", f"'{argv[0]}' got no answer within {timeout_s:.0f} s") from None


class Transport:
    """How to reach one machine: the local command line that runs a shell command there, and a push."""

    default_workdir = "/tmp"

    def __init__(self, spec: RemoteSpec, runner: Runner = _run) -> None:
        self.spec, self.runner = spec, runner

    def command(self, shell_command: str) -> list[str]:
        raise NotImplementedError

    def shell(self, shell_command: str, timeout_s: float = 120, input: bytes | None = None) -> subprocess.CompletedProcess:
        return self.runner(self.command(shell_command), timeout_s, input)

    def push(self, files: dict[str, Path], remote_dir: str, timeout_s: float = 900) -> None:
        """Copy each local file or directory to ``remote_dir/<name>`` (names may contain '/')."""
        raise NotImplementedError

    def failure(self, proc: subprocess.CompletedProcess, what: str) -> RemoteError:
        """The one-line reason a command failed, classified."""
        err = _text(proc.stderr)
        last = _last_line(err, proc.returncode)
        where = self.spec.address
        # GNU tar reports a full disk as a short write, without ENOSPC's text
        if re.search(r"No space left on device|Disk quota exceeded|Wrote only \d+ of \d+ bytes", err):
            return RemoteError("disk-full", f"{where}: {what}: the device's disk is full ({last})")
        return RemoteError("error", f"{where}: {what} failed: {last}")


def shell_path(path: str) -> str:
    """A path for the remote shell: quoted, but a leading ``~/`` left for the shell to expand."""
    return "~/" + shlex.quote(path[2:]) if path.startswith("~/") else shlex.quote(path)


def _last_line(err: str, code: int) -> str:
    """The line of a failed command's stderr that says why (ssh's host-key notices and tar's closing
    "Exiting with failure status" say nothing), else its exit code."""
    lines = [ln.strip() for ln in err.splitlines() if ln.strip() and not ln.startswith("Warning: Permanently")
             and "Exiting with failure status" not in ln]
    return lines[-1] if lines else f"exit code {code}"


def _text(data: Any) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


class SshTransport(Transport):
    """OpenSSH's ``ssh``, non-interactive (keys or an agent; never a password prompt)."""

    def base(self) -> list[str]:
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15", "-o", "ServerAliveInterval=10",
                "-o", "ServerAliveCountMax=3"]
        if self.spec.ssh_config:
            argv += ["-F", self.spec.ssh_config]
        if self.spec.port:
            argv += ["-p", str(self.spec.port)]
        return argv

    def command(self, shell_command: str) -> list[str]:
        return self.base() + ["--", self.spec.host, shell_command]

    def push(self, files: dict[str, Path], remote_dir: str, timeout_s: float = 900) -> None:
        # one tar stream through one connection: no scp/sftp needed on the device (BusyBox and Dropbear do)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, path in files.items():
                tar.add(str(path), arcname=name)
        proc = self.shell(f"mkdir -p {shell_path(remote_dir)} && tar -xf - -C {shell_path(remote_dir)}",
                          timeout_s, buf.getvalue())
        if proc.returncode != 0:
            raise self.failure(proc, "copying files")

    def failure(self, proc: subprocess.CompletedProcess, what: str) -> RemoteError:
        err = _text(proc.stderr)
        last = _last_line(err, proc.returncode)
        if proc.returncode == 255:  # ssh's own failure, not the command's
            where = self.spec.address
            if re.search(r"Permission denied|Too many authentication failures|Host key verification failed", err):
                return RemoteError("auth-failed", f"{where}: authentication failed ({last})")
            if re.search(r"closed by remote host|Broken pipe|not responding|Connection reset", err):
                return RemoteError("lost", f"{where}: lost the connection ({last})")
            return RemoteError("unreachable", f"{where}: cannot connect ({last})")
        return super().failure(proc, what)


class AdbTransport(Transport):
    """An Android device over adb; the worker runs under a Python on the device (e.g. Termux's)."""

    default_workdir = "/data/local/tmp"

    def adb(self, *args: str) -> list[str]:
        return ["adb", *(["-s", self.spec.host] if self.spec.host else []), *args]

    def command(self, shell_command: str) -> list[str]:
        return self.adb("shell", shell_command)

    def push(self, files: dict[str, Path], remote_dir: str, timeout_s: float = 900) -> None:
        dirs = sorted({str(Path(remote_dir, name).parent) for name in files})
        proc = self.shell("mkdir -p " + " ".join(shlex.quote(d) for d in dirs))
        if proc.returncode != 0:
            raise self.failure(proc, "making directories")
        for name, path in files.items():
            proc = self.runner(self.adb("push", str(path), f"{remote_dir}/{name}"), timeout_s, None)
            if proc.returncode != 0:
                raise self.failure(proc, f"adb push {path.name}")

    def failure(self, proc: subprocess.CompletedProcess, what: str) -> RemoteError:
        err = _text(proc.stderr) + _text(proc.stdout)
        last = _last_line(err, proc.returncode)
        if re.search(r"device .*not found|no devices/emulators found|device offline|device unauthorized|"
                     r"more than one device", err):
            kind = "auth-failed" if "unauthorized" in err else "unreachable"
            return RemoteError(kind, f"{self.spec.address}: {last}")
        if re.search(r"error: closed|protocol fault|device disconnected", err):
            return RemoteError("lost", f"{self.spec.address}: lost the device ({last})")
        return super().failure(proc, what)


class LoopbackTransport(Transport):
    """The "remote" is this machine through ``sh`` with a clean environment (no PYTHONPATH): tests."""

    def command(self, shell_command: str) -> list[str]:
        return ["env", "-u", "PYTHONPATH", "-u", "PYTHONHOME", "sh", "-c", shell_command]

    def push(self, files: dict[str, Path], remote_dir: str, timeout_s: float = 900) -> None:
        for name, path in files.items():
            dest = Path(remote_dir) / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(path, dest) if path.is_dir() else shutil.copy2(path, dest)


TRANSPORTS: dict[str, type[Transport]] = {"ssh": SshTransport, "adb": AdbTransport, "loopback": LoopbackTransport}


# --- one session on a remote machine ---------------------------------------------------------------

class RemoteHost:
    """A run's directory on a remote machine: opened (worker pushed, machine probed), used, removed.

    Use as a context manager; ``close`` runs on every exit path (errors, Ctrl-C, SIGTERM)."""

    def __init__(self, spec: RemoteSpec, transport: Transport | None = None) -> None:
        self.spec = spec
        self.transport = transport or TRANSPORTS[spec.kind](spec)
        self.dir = f"{(spec.workdir or self.transport.default_workdir).rstrip('/')}/edgevit-{uuid.uuid4().hex[:12]}"
        self.facts: dict[str, Any] | None = None
        self._pushed: set[str] = set()
        self._opened = False

    def __enter__(self) -> "RemoteHost":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self, timeout_s: float = 180) -> dict[str, Any]:
        """Push the worker, probe the machine; its facts (``remote``: the address, ``name``)."""
        self._opened = True
        self.push({"worker.py": worker_file()})
        proc = self.transport.shell(f"cd {shell_path(self.dir)} && {shell_path(self.spec.python)} worker.py probe",
                                    timeout_s)
        if proc.returncode != 0:
            raise self._python_failure(proc)
        lines = [ln for ln in _text(proc.stdout).splitlines() if ln.startswith("{")]
        try:
            facts = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            raise RemoteError("error", f"{self.spec.address}: the worker's probe gave no answer") from None
        self.facts = facts | {"remote": self.spec.address, "name": self.spec.name}
        if "version" not in facts["packages"].get("numpy", {}):
            raise RemoteError("no-python", f"{self.spec.address}: numpy is not installed for {self.spec.python} "
                                           f"there (pip install numpy)")
        return self.facts

    def _python_failure(self, proc: subprocess.CompletedProcess) -> RemoteError:
        failure = self.transport.failure(proc, "probing")
        if failure.kind == "error" and proc.returncode in (126, 127):
            return RemoteError("no-python", f"{self.spec.address}: no python at '{self.spec.python}' there "
                                            f"(--remote-python PATH, or python = \"...\" in the devices file)")
        return failure

    def push(self, files: dict[str, Path]) -> None:
        """Copy files into the run's directory (each name once per run)."""
        todo = {name: path for name, path in files.items() if name not in self._pushed}
        if todo:
            self.transport.push(todo, self.dir)
            self._pushed |= set(todo)

    def push_edgevit(self) -> str:
        """edgevit's own Python source as a zip (the model code PyTorch eager needs there); its name."""
        if EDGEVIT_ZIP not in self._pushed:
            with tempfile.TemporaryDirectory(prefix="edgevit-src-") as tmp:
                self.push({EDGEVIT_ZIP: source_zip(Path(tmp) / EDGEVIT_ZIP)})
        return EDGEVIT_ZIP

    def worker_command(self) -> list[str]:
        """The local command line that starts one ``worker.py serve`` there, stdin/stdout carried through.

        The inner ``sh`` records its pid (which becomes python's with ``exec``) for :meth:`close`; the
        outer shell reports the exit status on stderr, so a death by signal can be explained."""
        inner = 'echo $$ >> pids; exec "$0" worker.py serve'
        return self.transport.command(f"cd {shell_path(self.dir)} && sh -c {shlex.quote(inner)} "
                                      f"{shell_path(self.spec.python)}; echo {EXIT_MARK}$? >&2")

    def spawn(self, label: str) -> WorkerProcess:
        return WorkerProcess(label, self.worker_command(), explain=self.explain_exit)

    def explain_exit(self, code: int | None, lines: list[str]) -> str:
        """A dead remote worker's reason, from the status its shell reported (or the transport's error)."""
        status = next((int(ln[len(EXIT_MARK):]) for ln in reversed(lines) if ln.startswith(EXIT_MARK)
                       and ln[len(EXIT_MARK):].isdigit()), None)
        # the worker's own last words, not the shell's job report ("line 1: 123 Killed sh -c ...")
        said = [ln for ln in lines if not ln.startswith(EXIT_MARK) and "worker.py serve" not in ln][-1:]
        tail = f"; last stderr line: {said[0][:200]}" if said else ""
        if status is None:  # the connection, not the worker, ended
            failure = self.transport.failure(subprocess.CompletedProcess([], code or 255, "", "\n".join(lines)), "running")
            return f"no answer from the worker: {failure}"
        if status > 128:
            name = _signal_name(status - 128)
            why = " (the device's out-of-memory killer kills this way)" if status - 128 == signal.SIGKILL else ""
            return f"worker killed by {name} on {self.spec.address}{why}{tail}"
        return f"worker exit code {status} on {self.spec.address}{tail}"

    def close(self, timeout_s: float = 60) -> None:
        """Kill workers still running there and remove the run's directory; never raises."""
        if not self._opened:
            return
        quoted = shell_path(self.dir)
        command = (f"if [ -d {quoted} ]; then for p in $(cat {quoted}/pids 2>/dev/null); do kill -9 $p 2>/dev/null; "
                   f"done; rm -rf {quoted}; fi")
        try:
            self.transport.shell(command, timeout_s)
        except (EdgevitError, OSError):  # unreachable now: nothing more can be done from here
            pass
        self._opened = False


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def source_zip(path: Path) -> Path:
    """The installed edgevit package's .py files as a zip importable with ``sys.path.insert(0, zip)``."""
    import edgevit

    roots = {"edgevit": Path(edgevit.__file__).parent}
    for sub in ("export", "devices"):  # mapped into the package from the repository's top level
        module = __import__(f"edgevit.{sub}", fromlist=["_"])
        roots[f"edgevit/{sub}"] = Path(module.__file__).parent
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for arc_root, root in roots.items():
            for file in sorted(root.rglob("*.py")):
                rel = file.relative_to(root)
                if rel.parts[0] in ("export", "devices") and arc_root == "edgevit":
                    continue  # the top-level folders are the sub-packages, not copies inside edgevit/
                zf.write(file, f"{arc_root}/{rel.as_posix()}")
    return path


def transport_tools(kind: str) -> str | None:
    """None when the local tool for ``kind`` is installed, else why not."""
    tool = {"ssh": "ssh", "adb": "adb"}.get(kind)
    if tool and shutil.which(tool) is None:
        hint = "apt install openssh-client" if tool == "ssh" else "install Android platform-tools"
        return f"'{tool}' is not installed on this machine ({hint})"
    return None


__all__ = ["RemoteError", "RemoteSpec", "parse_remote", "resolve_remote", "RemoteHost", "SshTransport",
           "AdbTransport", "LoopbackTransport", "source_zip", "transport_tools"]
