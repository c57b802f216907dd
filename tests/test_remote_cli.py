"""``edgevit bench --remote`` and ``edgevit devices --remote`` against a real OpenSSH server on 127.0.0.1.

The server (fixture ``loopback_sshd``, tests/conftest.py) has a throw-away host key and user key; the
remote python is this test's own (it has every runtime), or a wrapper without onnxruntime. The devices
file of each test names the remote, its python and a work directory the test can inspect afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

EDGEVIT = [sys.executable, "-m", "edgevit.cli"]
FAST = ["--runs", "4", "--rounds", "2", "--warmup", "1", "--no-roofline"]


def run_cli(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEVIT, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def devices_file(where: Path, entries: dict[str, dict]) -> Path:
    lines = []
    for name, entry in entries.items():
        lines.append(f"[devices.{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in entry.items()]
    path = where / "edgevit-devices.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export cache for the module: deit_tiny's ONNX export is made once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def lab(tmp_path: Path, loopback_sshd) -> dict:
    """A working directory whose devices file names 'lab' (the loopback server, this python)."""
    remote = tmp_path / "remote"
    remote.mkdir()
    entry = {"remote": f"ssh:{loopback_sshd.alias}", "python": sys.executable, "workdir": str(remote),
             "ssh_config": str(loopback_sshd.config)}
    devices_file(tmp_path, {"lab": entry})
    return {"cwd": tmp_path, "remote": remote, "entry": entry}


def leftovers(remote: Path) -> list[str]:
    """What a run left on the 'device': files in its work directory, live workers started from there."""
    files = [str(p) for p in remote.iterdir()]
    procs = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(remote) in text and "worker.py" in text:
            procs.append(text)
    return files + procs


def test_bench_on_a_remote_reports_its_rows_and_cleans_up(lab: dict, cache: Path) -> None:
    out = lab["cwd"] / "b"
    proc = run_cli("bench", "--remote", "lab", "--models", "deit_tiny", "--device", "onnx:cpu", "--cache", str(cache),
                   "--out", str(out), "--runs", "6", "--rounds", "3", "--warmup", "1", cwd=lab["cwd"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    rows = {r["device"]: r for r in result["rows"]}
    assert set(rows) == {"torch:eager", "onnx:cpu"} and {r["host"] for r in rows.values()} == {"lab"}
    for row in rows.values():
        assert row["status"] == "ok" and row["summary"]["runs"] == 6, row
        assert 0.05 < row["summary"]["median_ms"] < 5000  # a 1.3 GMAC model on a CPU: milliseconds
    assert rows["torch:eager"]["runtime_info"]["edgevit_source"] == "edgevit-src.zip"  # model code was pushed
    assert rows["onnx:cpu"]["speedup_vs_eager"]["median"] > 0 and rows["onnx:cpu"]["baseline"] == "torch:eager"
    (host,) = result["hosts"]
    assert host["name"] == "lab" and host["address"] == "ssh:edgevit-loopback" and host["status"] == "ok"
    assert host["machine"]["cores"] >= 1 and isinstance(host["machine"]["cpu_flags"], list)
    assert host["runtimes"]["onnxruntime"] and [g["host"] for g in result["gemm"]] == ["lab"]
    report = (out / "report.md").read_text()
    assert "- lab (ssh:edgevit-loopback): " in report and "Rounds interleave within one machine only" in report
    assert "| host | model |" in report
    assert (out / "bench.csv").read_text().startswith("host,model,device")
    assert "lab (ssh:edgevit-loopback)" in proc.stdout and "CPU flags:" in proc.stdout
    assert leftovers(lab["remote"]) == []


def test_remote_ssh_address_with_an_alias_and_ssh_config_from_the_environment(tmp_path: Path, loopback_sshd,
                                                                              cache: Path) -> None:
    """``--remote ssh:ALIAS`` with the alias in an ssh_config named by EDGEVIT_SSH_CONFIG, no devices file."""
    env = {**os.environ, "EDGEVIT_SSH_CONFIG": str(loopback_sshd.config)}
    proc = subprocess.run([*EDGEVIT, "devices", "--remote", f"ssh:{loopback_sshd.alias}", "--remote-python",
                           sys.executable, "--json"], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    (machine,) = result["machines"]
    assert machine["address"] == f"ssh:{loopback_sshd.alias}" and machine["facts"]["remote"] == machine["address"]
    rows = {r["device"]: r for r in result["devices"]}
    assert rows["onnx:cpu"]["available"] and rows["onnx:cpu"]["host"] == f"ssh:{loopback_sshd.alias}"
    assert not rows["coreml:all"]["available"] and "macOS" in rows["coreml:all"]["reason"]


def test_wrong_key_is_an_auth_failure_row(lab: dict, loopback_sshd) -> None:
    devices_file(lab["cwd"], {"lab": lab["entry"] | {"remote": f"ssh:{loopback_sshd.wrong_alias}"}})
    proc = run_cli("bench", "--remote", "lab", "--models", "deit_tiny", "--device", "onnx:cpu", *FAST,
                   "--out", str(lab["cwd"] / "b"), cwd=lab["cwd"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (row,) = json.loads((lab["cwd"] / "b" / "bench.json").read_text())["rows"]
    assert row["status"] == "auth-failed" and "authentication failed" in row["detail"] and "\n" not in row["detail"]
    assert leftovers(lab["remote"]) == []


def test_a_remote_python_without_the_runtime_gives_an_unavailable_row(lab: dict, cache: Path) -> None:
    stubs = lab["cwd"] / "stubs"
    stubs.mkdir()
    (stubs / "onnxruntime.py").write_text('raise ModuleNotFoundError("No module named \'onnxruntime\'", name="onnxruntime")\n')
    wrapper = lab["cwd"] / "python-without-onnxruntime"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={stubs} exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    proc = run_cli("bench", "--remote", "lab", "--remote-python", str(wrapper), "--models", "deit_tiny",
                   "--device", "onnx:cpu", "--cache", str(cache), *FAST, "--out", str(lab["cwd"] / "b"), cwd=lab["cwd"])
    assert proc.returncode == 1, proc.stderr[-2000:]  # a device asked for by name is missing there
    rows = {r["device"]: r for r in json.loads((lab["cwd"] / "b" / "bench.json").read_text())["rows"]}
    assert rows["onnx:cpu"]["status"] == "unavailable" and rows["onnx:cpu"]["requested"] is True
    assert "onnxruntime is not installed" in rows["onnx:cpu"]["detail"] and str(wrapper) not in rows["onnx:cpu"]["detail"]
    assert rows["torch:eager"]["status"] == "ok"  # the rest of the matrix goes on
    assert leftovers(lab["remote"]) == []


def test_ctrl_c_stops_the_remote_workers_and_removes_the_directory(lab: dict, cache: Path) -> None:
    # exports first (cached), so the interrupt lands while the remote workers run
    warm = run_cli("bench", "--remote", "lab", "--models", "deit_tiny", "--device", "onnx:cpu", "--cache", str(cache),
                   *FAST, "--out", str(lab["cwd"] / "w"), cwd=lab["cwd"])
    assert warm.returncode == 0, warm.stderr[-2000:]
    proc = subprocess.Popen([*EDGEVIT, "bench", "--remote", "lab", "--models", "deit_tiny", "--device", "onnx:cpu",
                             "--cache", str(cache), "--runs", "4000", "--rounds", "4", "--no-roofline",
                             "--out", str(lab["cwd"] / "b")], cwd=lab["cwd"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(lab["remote"].glob("*/pids")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(2)  # workers loading or measuring
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert leftovers(lab["remote"]) == []
    assert not (lab["cwd"] / "b" / "bench.json").exists()  # nothing that looks finished


def test_unreachable_host_is_a_row_not_a_traceback(tmp_path: Path) -> None:
    proc = run_cli("bench", "--remote", "ssh://127.0.0.1:1", "--models", "deit_tiny", "--device", "onnx:cpu", *FAST,
                   "--out", str(tmp_path / "b"), cwd=tmp_path, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    (row,) = result["rows"]
    assert row["status"] == "unreachable" and "cannot connect" in row["detail"] and "refused" in row["detail"]
    assert result["hosts"][0]["status"] == "unreachable"


@pytest.mark.parametrize("remote, message", [
    ("ssh:", "is not a host name"), ("ssh:-oProxyCommand=touch", "is not a host name"),
    ("ssh:pi@host:22", "give a port as ssh://"), ("ssh://pi@host:99999", "port 99999"),
    ("ftp:host", "unknown remote"), ("pi5", "no device of that name"), ("adb:-d", "is not an adb serial"),
])
def test_bad_remote_syntax_exits_2_in_one_line(tmp_path: Path, remote: str, message: str) -> None:
    for command in (["bench", "--models", "deit_tiny"], ["devices"]):
        proc = run_cli(*command, "--remote", remote, "--out" if command[0] == "bench" else "--json",
                       *([str(tmp_path / "b")] if command[0] == "bench" else []), cwd=tmp_path, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
    assert not (tmp_path / "b").exists()


def test_devices_all_lists_this_machine_and_every_named_device(tmp_path: Path, loopback_sshd) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    (tmp_path / "pyproject.toml").write_text(
        "[project]\nname = 'x'\n\n[tool.edgevit.devices]\n"
        f"dead = \"ssh://127.0.0.1:1\"\n\n[tool.edgevit.devices.lab]\nremote = \"ssh:{loopback_sshd.alias}\"\n"
        f"python = \"{sys.executable}\"\nworkdir = \"{remote}\"\nssh_config = \"{loopback_sshd.config}\"\n")
    proc = run_cli("devices", "--all", "--json", cwd=tmp_path, timeout=300)
    assert proc.returncode == 1  # one named device is unreachable
    result = json.loads(proc.stdout)
    status = {m["name"]: m["status"] for m in result["machines"]}
    assert status == {"local": "ok", "dead": "unreachable", "lab": "ok"}
    assert {r["host"] for r in result["devices"]} == {"local", "lab"}
    assert "error: ssh://127.0.0.1:1: cannot connect" in proc.stderr and "Traceback" not in proc.stderr
    table = run_cli("devices", "--remote", "lab", cwd=tmp_path, timeout=300)
    assert table.returncode == 0 and "devices on lab (ssh:edgevit-loopback)" in table.stdout
    assert "CPU flags:" in table.stdout and "onnxruntime" in table.stdout
    assert leftovers(remote) == []


@pytest.mark.parametrize("content, message", [
    ("[devices]\npi = 3\n", "give an address"),
    ("[devices.pi]\nremote = \"ssh:pi@h\"\ncolour = \"red\"\n", "unknown key 'colour'"),
    ("[devices.pi]\nremote = \"ssh:pi@h\"\nthreads = 0\n", "threads must be >= 1"),
    ("[devices.pi]\nremote = \"telnet:h\"\n", "unknown remote"),
    ("[devices\n", "devices file"),
])
def test_bad_devices_file_is_one_line(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "edgevit-devices.toml").write_text(content)
    proc = run_cli("devices", "--all", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_devices_on_an_adb_device_from_the_cli(tmp_path: Path, fake_adb) -> None:
    """The adb transport end to end from the CLI (a fake adb on PATH maps the device onto a folder)."""
    workdir = fake_adb.device_root / "tmp"
    workdir.mkdir()
    devices_file(tmp_path, {"phone": {"remote": f"adb:{fake_adb.serial}", "python": sys.executable,
                                      "workdir": str(workdir)}})
    proc = run_cli("devices", "--remote", "phone", "--json", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert [m["address"] for m in result["machines"]] == [f"adb:{fake_adb.serial}"]
    assert {r["host"] for r in result["devices"]} == {"phone"}
    assert not next(r for r in result["devices"] if r["device"] == "onnx:nnapi")["available"]  # not Android
    assert os.listdir(workdir) == []
    assert any(c[3:4] == ["push"] for c in fake_adb.calls())
    gone = run_cli("devices", "--remote", "adb:emulator-0000", cwd=tmp_path, timeout=300)
    assert gone.returncode == 1 and "emulator-0000" in gone.stderr and "Traceback" not in gone.stderr
