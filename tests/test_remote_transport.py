"""Remote devices for real: a throw-away OpenSSH server on 127.0.0.1 and a fake ``adb`` first on PATH.

Nothing in the transports is mocked: ``RemoteHost`` runs the real ``ssh`` client against a real ``sshd``
(``loopback_sshd`` in conftest.py) and the real command lines against a fake adb whose device is this
machine (``fake_adb``). Workers use the worker's ``fake`` runtime (sleeps; crashes, hangs or is
SIGKILLed where told), so the whole file takes seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from edgevit.devices.harness import Config, Protocol, measure
from edgevit.devices.remote import RemoteError, RemoteHost, RemoteSpec, parse_remote, resolve_remote
from edgevit.devices.worker_bundle import worker_file

from edgevit.errors import EdgevitError

FAST = Protocol(runs=6, rounds=3, warmup=1, gap_s=0, load_timeout_s=60, run_timeout_s=60)


def fake(label: str, **options) -> Config:
    return Config(label, {"runtime": "fake", "threads": 1, "options": {"ms": 1.0, **options}}, {"device": label})


def ssh_spec(sshd, workdir: Path, **overrides) -> RemoteSpec:
    fields = {"python": sys.executable, "ssh_config": sshd.config, "workdir": str(workdir)} | overrides
    return RemoteSpec("loopback", "ssh", sshd.alias, **fields)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "remote"
    path.mkdir()
    return path


def leftovers(remote_dir: str) -> list[str]:
    """Processes whose command line mentions ``remote_dir`` or whose working directory is inside it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                cwd = ""
        except OSError:  # gone meanwhile
            continue
        if remote_dir in args or cwd == remote_dir or cwd.startswith((remote_dir + "/", remote_dir + " ")):
            found.append(f"{entry.name}: {args or '?'} (cwd {cwd or '?'})")
    return found


def assert_no_leftovers(remote_dir: str, within_s: float = 10) -> None:
    deadline = time.monotonic() + within_s
    while (found := leftovers(remote_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not found, f"processes left behind for {remote_dir}: {found}"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


# --- naming a remote -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, kind, host, port, address", [
    ("ssh:pi@10.0.0.7", "ssh", "pi@10.0.0.7", None, "ssh:pi@10.0.0.7"),
    ("ssh:alias", "ssh", "alias", None, "ssh:alias"),
    ("ssh://user@host:2222", "ssh", "user@host", 2222, "ssh://user@host:2222"),
    ("ssh://host", "ssh", "host", None, "ssh:host"),
    ("adb:emulator-5554", "adb", "emulator-5554", None, "adb:emulator-5554"),
    ("adb:192.168.1.5:5555", "adb", "192.168.1.5:5555", None, "adb:192.168.1.5:5555"),
    ("adb:", "adb", "", None, "adb:"),
])
def test_parse_remote_good_forms(text, kind, host, port, address):
    spec = parse_remote(text)
    assert (spec.kind, spec.host, spec.port, spec.address) == (kind, host, port, address)
    assert spec.name == text and spec.python == "python3"
    assert parse_remote(text, python="/opt/py/bin/python3").python == "/opt/py/bin/python3"


def test_parse_remote_ipv6_url():
    spec = parse_remote("ssh://[::1]:22")
    assert (spec.kind, spec.host, spec.port) == ("ssh", "::1", 22)


def test_ipv6_address_is_bracketed_and_round_trips():
    spec = parse_remote("ssh://[::1]:22")
    assert spec.address == "ssh://[::1]:22"
    again = parse_remote(spec.address)
    assert (again.host, again.port) == ("::1", 22)


@pytest.mark.parametrize("text", ["ssh:", "ssh:-oProxyCommand=x", "ssh:host:22", "ssh://h:99999", "ssh://h:0",
                                  "ssh://-oProxyCommand=x", "ssh:a b", "ssh:pi@host;reboot", "ftp:x", "adb:-x",
                                  "adb:a b"])
def test_parse_remote_bad_forms(text):
    with pytest.raises(EdgevitError) as err:
        parse_remote(text)
    assert not isinstance(err.value, RemoteError)  # a usage error, not a failed connection
    message = str(err.value)
    assert "\n" not in message and text.strip() in message


def test_resolve_remote_names_and_addresses():
    named = {"pi5": RemoteSpec("pi5", "ssh", "pi@10.0.0.7", python="/usr/bin/python3")}
    assert resolve_remote("pi5", named) is named["pi5"]
    assert resolve_remote("pi5", named, python="/opt/python").python == "/opt/python"
    assert resolve_remote("adb:emulator-5554", named).kind == "adb"
    with pytest.raises(EdgevitError, match="no device of that name.*no devices file"):
        resolve_remote("pi5", {})
    with pytest.raises(EdgevitError, match="the devices file names: pi5"):
        resolve_remote("pi4", named)
    with pytest.raises(EdgevitError, match="empty"):
        resolve_remote("  ", named)


# --- over a real sshd ----------------------------------------------------------------------------

def test_ssh_open_measure_close(loopback_sshd, workdir):
    host = RemoteHost(ssh_spec(loopback_sshd, workdir))
    assert Path(host.dir).parent == workdir
    notes: list[str] = []
    try:
        facts = host.open()
        assert (Path(host.dir) / "worker.py").read_bytes() == worker_file().read_bytes()  # the bundle
        assert host.worker_command()[0] == "ssh"
        results = measure([fake("A"), fake("B", ms=3.0)], FAST, notes.append, spawn=host.spawn)
    finally:
        host.close()
    assert facts["remote"] == f"ssh:{loopback_sshd.alias}" and facts["name"] == "loopback"
    assert facts["platform"]["executable"] == sys.executable
    assert facts["cpu"]["cores"] >= 1 and facts["cpu"]["model"]
    assert "version" in facts["packages"]["numpy"] and "version" in facts["packages"]["onnxruntime"]
    assert "CPUExecutionProvider" in facts["onnxruntime"]["providers"]
    for m, ms in zip(results, (1.0, 3.0)):
        assert m.status == "ok", m.detail
        assert len(m.times_ms) == 6 and [len(r) for r in m.rounds] == [2, 2, 2]
        assert all(t >= ms for t in m.times_ms)
        assert m.info["runtime"] == "fake" and m.platform["protocol"] == 1 and m.peak_rss_mb > 0
    rounds = [n.split(": ", 1)[1] for n in notes if n.startswith("round ")]
    assert rounds == ["A", "B", "B", "A", "A", "B"]  # A B / B A / A B: interleaved, alternating
    assert os.listdir(workdir) == []
    assert_no_leftovers(host.dir)


def test_ssh_worker_killed_mid_run(loopback_sshd, workdir):
    host = RemoteHost(ssh_spec(loopback_sshd, workdir))
    try:
        host.open()
        killed, fine = measure([fake("killed", sigkill="run:3"), fake("fine")], FAST, spawn=host.spawn)
    finally:
        host.close()
    assert killed.status == "crashed"
    assert "SIGKILL" in killed.detail and "out-of-memory" in killed.detail, killed.detail
    assert f"ssh:{loopback_sshd.alias}" in killed.detail
    assert fine.status == "ok" and len(fine.times_ms) == 6, fine.detail
    assert os.listdir(workdir) == []
    assert_no_leftovers(host.dir)


def test_ssh_worker_killed_from_outside(loopback_sshd, workdir):
    host = RemoteHost(ssh_spec(loopback_sshd, workdir))
    protocol = Protocol(runs=30, rounds=3, warmup=0, gap_s=0, run_timeout_s=30)  # blocks of 10 x 50 ms
    in_round = threading.Event()
    seen: dict[str, object] = {}

    def progress(message: str) -> None:
        if message.startswith("round 1/"):
            in_round.set()

    def killer() -> None:
        try:
            pids = Path(host.dir) / "pids"
            deadline = time.monotonic() + 30
            while not (pids.exists() and pids.read_text().split()) and time.monotonic() < deadline:
                time.sleep(0.05)
            pid = int(pids.read_text().split()[0])  # the first worker started: "victim"
            seen["cmdline"] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            in_round.wait(30)
            time.sleep(0.2)  # inside victim's first timed block
            os.kill(pid, signal.SIGKILL)
            seen["killed"] = pid
        except Exception as exc:  # noqa: BLE001 - reported by the assertions below
            seen["error"] = repr(exc)

    thread = threading.Thread(target=killer, daemon=True)
    try:
        host.open()
        thread.start()
        victim, survivor = measure([fake("victim", ms=50.0), fake("survivor")], protocol, progress,
                                   spawn=host.spawn)
    finally:
        thread.join(30)
        host.close()
    assert "killed" in seen, seen
    assert "worker.py serve" in str(seen["cmdline"])  # the recorded pid is the worker itself (sh exec'd it)
    assert victim.status == "crashed" and "SIGKILL" in victim.detail, victim.detail
    assert len(victim.times_ms) < 30
    assert survivor.status == "ok" and len(survivor.times_ms) == 30, survivor.detail
    assert os.listdir(workdir) == []
    assert_no_leftovers(host.dir)


def test_ssh_hang_times_out_and_leaves_nothing(loopback_sshd, workdir):
    host = RemoteHost(ssh_spec(loopback_sshd, workdir))
    protocol = Protocol(runs=6, rounds=3, warmup=1, gap_s=0, run_timeout_s=3)
    try:
        host.open()
        start = time.monotonic()
        hung, fine = measure([fake("hung", hang="run:2"), fake("fine")], protocol, spawn=host.spawn)
        took = time.monotonic() - start
        # the harness killed its ssh; the connection's end is the end of the worker's stdin: it exits by
        # itself, before close() would kill it (devices/remote.py, step 3)
        assert_no_leftovers(host.dir)
    finally:
        host.close()
    assert hung.status == "timeout" and "within 3 s" in hung.detail, hung.detail
    assert fine.status == "ok", fine.detail
    assert took < 20
    assert os.listdir(workdir) == []
    assert_no_leftovers(host.dir)


def test_ssh_wrong_key_is_auth_failed(loopback_sshd, workdir):
    host = RemoteHost(RemoteSpec("loopback", "ssh", loopback_sshd.wrong_alias, python=sys.executable,
                                 ssh_config=loopback_sshd.config, workdir=str(workdir)))
    with pytest.raises(RemoteError) as err:
        host.open()
    host.close()
    assert err.value.kind == "auth-failed", str(err.value)
    assert "\n" not in str(err.value) and "Permission denied" in str(err.value)
    assert os.listdir(workdir) == []  # nothing got there


def test_ssh_closed_port_is_unreachable(loopback_sshd, workdir):
    port = closed_port()
    host = RemoteHost(RemoteSpec("nobody", "ssh", "127.0.0.1", port=port, python=sys.executable,
                                 ssh_config=loopback_sshd.config, workdir=str(workdir)))
    with pytest.raises(RemoteError) as err:
        host.open()
    host.close()
    assert err.value.kind == "unreachable", str(err.value)
    assert "\n" not in str(err.value) and "Connection refused" in str(err.value)
    assert f"ssh://127.0.0.1:{port}" in str(err.value)


def test_ssh_missing_python_is_no_python(loopback_sshd, workdir):
    host = RemoteHost(ssh_spec(loopback_sshd, workdir, python="/nonexistent/python3"))
    try:
        with pytest.raises(RemoteError) as err:
            host.open()
    finally:
        host.close()
    assert err.value.kind == "no-python", str(err.value)
    assert "/nonexistent/python3" in str(err.value) and "\n" not in str(err.value)
    assert os.listdir(workdir) == []


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 256 KiB tmpfs: the remote machine's full disk."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {(proc.stderr or proc.stdout).strip() or proc.returncode}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


def test_ssh_full_disk(loopback_sshd, small_disk, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(1 << 20))
    host = RemoteHost(ssh_spec(loopback_sshd, small_disk))
    try:
        host.open()  # worker.py (~50 KB) fits
        with pytest.raises(RemoteError) as err:
            host.push({"model.onnx": big})
    finally:
        host.close()
    assert os.listdir(small_disk) == []
    assert err.value.kind == "disk-full", str(err.value)
    assert "\n" not in str(err.value)


def test_ssh_full_disk_cleanup(loopback_sshd, small_disk, tmp_path):
    """Whatever the classification, a failed push is an error and close() empties the disk again."""
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(1 << 20))
    host = RemoteHost(ssh_spec(loopback_sshd, small_disk))
    try:
        host.open()
        with pytest.raises(RemoteError) as err:
            host.push({"model.onnx": big})
        assert os.listdir(small_disk) != []
    finally:
        host.close()
    assert "\n" not in str(err.value) and "copying files" in str(err.value)
    assert os.listdir(small_disk) == []


def test_ssh_python_without_runtime(loopback_sshd, workdir, tmp_path):
    from edgevit.devices.table import DEVICES

    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "onnxruntime.py").write_text(
        'raise ModuleNotFoundError("No module named \'onnxruntime\'", name="onnxruntime")\n')
    python = tmp_path / "python-without-ort"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={stub}\nexport PYTHONPATH\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    host = RemoteHost(ssh_spec(loopback_sshd, workdir, python=str(python)))
    try:
        facts = host.open()
    finally:
        host.close()
    assert facts["packages"]["onnxruntime"] == {"missing": True}
    assert "version" in facts["packages"]["numpy"]
    reason = DEVICES["onnx:cpu"].unavailable_reason(facts)
    assert reason and "onnxruntime is not installed" in reason, reason
    assert DEVICES["openvino:cpu"].unavailable_reason(facts) is None  # only the stubbed runtime is gone


# --- over (a fake) adb -------------------------------------------------------------------------------

def adb_spec(fake_adb, serial: str | None = None) -> RemoteSpec:
    workdir = fake_adb.device_root / "tmp"
    workdir.mkdir(exist_ok=True)
    return RemoteSpec("phone", "adb", serial or fake_adb.serial, python=sys.executable, workdir=str(workdir))


def test_adb_open_measure_close(fake_adb):
    spec = adb_spec(fake_adb)
    host = RemoteHost(spec)
    notes: list[str] = []
    try:
        facts = host.open()
        results = measure([fake("A"), fake("B")], FAST, notes.append, spawn=host.spawn)
    finally:
        host.close()
    assert facts["remote"] == "adb:emulator-5554" and "version" in facts["packages"]["numpy"]
    for m in results:
        assert m.status == "ok", m.detail
        assert len(m.times_ms) == 6
    assert [n.split(": ", 1)[1] for n in notes if n.startswith("round ")] == ["A", "B", "B", "A", "A", "B"]
    assert os.listdir(spec.workdir) == []
    calls = fake_adb.calls()
    assert calls and all(c[:3] == ["adb", "-s", "emulator-5554"] for c in calls), calls
    assert ["adb", "-s", "emulator-5554", "push", str(worker_file()), f"{host.dir}/worker.py"] in calls
    shells = [c[4] for c in calls if c[3] == "shell"]
    assert any("worker.py probe" in s for s in shells)
    assert sum("worker.py serve" in s for s in shells) == 2  # one worker per configuration
    assert any("rm -rf" in s and host.dir in s for s in shells)
    assert_no_leftovers(host.dir)


def test_adb_wrong_serial_is_unreachable(fake_adb):
    host = RemoteHost(adb_spec(fake_adb, "emulator-9999"))
    with pytest.raises(RemoteError) as err:
        host.open()
    host.close()
    assert err.value.kind == "unreachable", str(err.value)
    assert "emulator-9999" in str(err.value) and "not found" in str(err.value) and "\n" not in str(err.value)


def test_adb_device_disappears_mid_run(fake_adb):
    host = RemoteHost(adb_spec(fake_adb))
    protocol = Protocol(runs=60, rounds=3, warmup=0, gap_s=0, run_timeout_s=30)  # blocks of 20 x 50 ms
    timers: list[threading.Timer] = []

    def progress(message: str) -> None:
        if message.startswith("round 1/") and not timers:
            timers.append(threading.Timer(0.3, fake_adb.disappear))
            timers[0].start()

    try:
        host.open()
        start = time.monotonic()
        results = measure([fake("slow", ms=50.0), fake("other", ms=50.0)], protocol, progress, spawn=host.spawn)
        took = time.monotonic() - start
    finally:
        for timer in timers:
            timer.join()
        host.close()  # the device is gone: must not raise
    assert timers and fake_adb.gone_marker.exists()
    assert took < 20
    slow = results[0]
    assert slow.status == "crashed", slow.detail
    assert "no answer" in slow.detail and ("lost" in slow.detail or "not found" in slow.detail), slow.detail
    assert "adb:emulator-5554" in slow.detail and "\n" not in slow.detail
    assert all(m.status == "crashed" for m in results), [(m.label, m.status, m.detail) for m in results]
    assert_no_leftovers(host.dir)


def test_a_home_relative_python_is_expanded_by_the_remote_shell(tmp_path):
    """``--remote-python '~/venv/bin/python'``: quoted for the shell except the leading ``~/``."""
    from edgevit.devices.remote import shell_path

    home = tmp_path / "home"
    (home / "my env").mkdir(parents=True)
    out = subprocess.run(["sh", "-c", f"echo {shell_path('~/my env/python')}"], capture_output=True, text=True,
                         env={"HOME": str(home), "PATH": os.environ["PATH"]}, check=True).stdout.strip()
    assert out == f"{home}/my env/python"
    assert shell_path("/opt/py; rm -rf /") == "'/opt/py; rm -rf /'"
