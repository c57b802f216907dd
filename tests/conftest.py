"""Shared test plumbing: fast tests first, and a probe of the largest tensor rank a forward produces."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Callable

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


# edgevit's own tests hold the passes to strict: a pass that would be rolled back for a user fails the test
# that exports the model (the export children of CLI tests inherit it). Tests of the rollback itself pass
# strict_passes=False.
os.environ.setdefault("EDGEVIT_STRICT_PASSES", "1")


class _MaxRank(TorchDispatchMode):
    """Records the largest rank of any tensor an aten op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.max_rank = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ranks = [t.ndim for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.max_rank = max([self.max_rank, *ranks])
        return out


@pytest.fixture
def max_rank() -> Callable[..., int]:
    """``max_rank(model, *inputs)``: the largest tensor rank any op of ``model(*inputs)`` produces."""

    def probe(model: torch.nn.Module, *inputs: torch.Tensor) -> int:
        with torch.no_grad(), _MaxRank() as mode:
            model(*inputs)
        return mode.max_rank

    return probe


@pytest.fixture
def executor_vs_onnxruntime() -> Callable[..., object]:
    """``check(coreml_artifact, onnx_artifact, precision, seed=0)``: the MIL reference executor's fp32 run
    of a Core ML package vs onnxruntime on an ONNX artifact of the same model, on one seeded input,
    compared at ``precision``'s bound; returns the parity report. Two converters' outputs executed by two
    independent engines: a shared mistake with PyTorch would have to be made twice."""

    def check(coreml_artifact, onnx_artifact, precision: str, seed: int = 0):
        import numpy as np

        from edgevit.export.backends.coreml.mil import MILExecutor, load_program
        from edgevit.devices.runtimes import load_runner
        from edgevit.export.parity import compare

        program = load_program(coreml_artifact)
        runner = load_runner("onnx", onnx_artifact)
        shape = runner.session.session.get_inputs()[0].shape  # the onnxruntime InferenceSession
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        return compare([runner.run([x])], [MILExecutor(program, "fp32").run([x])], program.outputs, precision)

    return check


# --- a seeded tiny ViT for the quantization tests (test_quant_{onnx,openvino,tflite,coreml}.py) ---------------


class QuantBlock(nn.Module):
    """Pre-norm transformer block: attention, then a GELU MLP of width ``mlp``, each inside a residual add.
    ``attention="mha"`` is nn.MultiheadAttention; ``"qkv"`` is a fused qkv Linear, explicit scaled softmax
    attention (two batch matmuls) and an output Linear."""

    def __init__(self, dim: int, mlp: int, heads: int = 4, attention: str = "mha") -> None:
        super().__init__()
        if attention not in ("mha", "qkv"):
            raise ValueError(f"attention must be 'mha' or 'qkv', not {attention!r}")
        self.heads, self.fused_qkv = heads, attention == "qkv"
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        if self.fused_qkv:
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        else:
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_qkv:
            b, n, d = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            attn = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(-1)
            x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))
        else:
            h = self.norm1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class QuantTinyViT(nn.Module):
    """Conv patch embedding (4x4 patches of a 16x16 image: 16 tokens), optional learned position embedding,
    ``depth`` QuantBlocks, final LayerNorm, mean over the tokens, Linear head to 10 classes."""

    def __init__(self, dim: int = 256, depth: int = 2, mlp: int | None = None, heads: int = 4,
                 attention: str = "mha", pos_embed: bool = True) -> None:
        super().__init__()
        mlp = 2 * dim if mlp is None else mlp
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.pos = nn.Parameter(0.02 * torch.randn(1, 16, dim)) if pos_embed else None
        self.blocks = nn.Sequential(*[QuantBlock(dim, mlp, heads, attention) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        if self.pos is not None:
            x = x + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


@pytest.fixture(scope="session")
def seeded_vit() -> Callable[..., nn.Module]:
    """``make(dim=256, depth=2, mlp=None, heads=4, attention="mha", pos_embed=True, perturb=True, seed=0)``:
    ``torch.manual_seed(seed)``, a new QuantTinyViT in eval mode (``mlp`` defaults to ``2 * dim``). With
    ``perturb`` every 1-D parameter (LayerNorm affines, biases) is set to 1 + 0.1 N(0, 1) (weights) or
    0.1 N(0, 1) (biases), so no pass can drop them as identities. The global generator is left where the
    model's construction left it, so a ``torch.randn`` example input that follows is seeded too."""

    def make(dim: int = 256, depth: int = 2, mlp: int | None = None, heads: int = 4, attention: str = "mha",
             pos_embed: bool = True, perturb: bool = True, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        model = QuantTinyViT(dim, depth, mlp, heads, attention, pos_embed).eval()
        if perturb:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if param.ndim == 1:
                        param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(param.shape))
        return model

    return make


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full-zoo", action="store_true",
                     help="also run the tests marked full_zoo (every zoo model, not one per family; ~1 h)")
    parser.addoption("--full-quant", action="store_true",
                     help="also run the tests marked full_quant (the whole trained-model quantization table)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # full_zoo tests repeat the per-family checks on every variant: too long for the 30-minute CI, so they
    # run only when asked for (the nightly workflow, and before a release).
    for option, marker in (("--full-zoo", "full_zoo"), ("--full-quant", "full_quant")):
        if not config.getoption(option):
            deselected = [item for item in items if item.get_closest_marker(marker)]
            if deselected:
                config.hook.pytest_deselected(items=deselected)
                items[:] = [item for item in items if not item.get_closest_marker(marker)]
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


# --- remote devices: a real sshd on 127.0.0.1 and a fake adb ----------------------------------------

import dataclasses
import fcntl
import getpass
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class LoopbackSshd:
    """A throw-away OpenSSH server on 127.0.0.1 and an ssh_config that reaches it."""

    port: int
    config: str  # ssh -F CONFIG
    alias: str  # reaches the server with the authorized key
    wrong_alias: str  # the same server, a key that is not authorized
    root: Path  # the temporary directory holding keys, configs and the server's log


def _find_sshd() -> str | None:
    found = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
    return os.path.abspath(found) if found else None  # sshd re-executes itself: it needs an absolute path


def _install_sshd() -> str | None:
    """Installs openssh-server with apt (root only), one xdist worker at a time; None with a reason if not."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "OpenSSH server (sshd) is not installed and cannot be installed here (needs root and apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "openssh-server"]
    with open("/tmp/edgevit-tests-apt.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _find_sshd():  # the other worker installed it meanwhile
                return None
            try:
                if subprocess.run(install, env=env, capture_output=True, timeout=600, check=False).returncode != 0:
                    subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600, check=False)
                    proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600,
                                          check=False)
                    if proc.returncode != 0:
                        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                        return f"apt-get install openssh-server failed: {tail}"
            except subprocess.TimeoutExpired:
                return "apt-get install openssh-server took longer than 600 s"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return None if _find_sshd() else "openssh-server was installed but no sshd binary was found"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
                   check=True, capture_output=True, timeout=60)
    return path.with_suffix(".pub").read_text().strip()


@pytest.fixture(scope="session")
def loopback_sshd(tmp_path_factory: pytest.TempPathFactory):
    """A real sshd on 127.0.0.1 (a free port), key-only; ``ssh -F config alias`` reaches it as this user."""
    sshd = _find_sshd()
    if sshd is None:
        reason = _install_sshd()
        sshd = _find_sshd()
        if sshd is None:
            pytest.skip(reason or "no sshd")
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            pytest.skip(f"'{tool}' is not installed (openssh-client)")
    root = tmp_path_factory.mktemp("sshd")
    host_pub = _keygen(root / "host_ed25519")
    user_pub = _keygen(root / "user_ed25519")
    _keygen(root / "wrong_ed25519")
    (root / "authorized_keys").write_text(user_pub + "\n")
    port = _free_port()
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join(host_pub.split()[:2])}\n")
    (root / "sshd_config").write_text("\n".join([
        f"ListenAddress 127.0.0.1:{port}",
        f"HostKey {root / 'host_ed25519'}",
        f"AuthorizedKeysFile {root / 'authorized_keys'}",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password",
        "StrictModes no",
        "UsePAM no",
        f"PidFile {root / 'sshd.pid'}",
        "LogLevel ERROR",
        "",
    ]))
    user = getpass.getuser()
    common = ["    HostName 127.0.0.1", f"    Port {port}", f"    User {user}", "    IdentitiesOnly yes",
              "    IdentityAgent none", f"    UserKnownHostsFile {root / 'known_hosts'}",
              "    GlobalKnownHostsFile /dev/null", "    StrictHostKeyChecking yes", "    BatchMode yes",
              "    UpdateHostKeys no", "    ControlMaster no", "    ControlPath none", "    LogLevel ERROR"]
    alias, wrong_alias = "edgevit-loopback", "edgevit-loopback-wrongkey"
    config = root / "ssh_config"
    config.write_text("\n".join([
        f"Host {alias}", f"    IdentityFile {root / 'user_ed25519'}", *common,
        f"Host {wrong_alias}", f"    IdentityFile {root / 'wrong_ed25519'}", *common, "",
    ]))
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
    log_path = root / "sshd.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([sshd, "-D", "-e", "-f", str(root / "sshd_config")], stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            if server.poll() is not None:
                pytest.skip(f"sshd exited with code {server.returncode}: {log_path.read_text().strip()[-500:]}")
            probe = subprocess.run(["ssh", "-F", str(config), alias, "true"], stdin=subprocess.DEVNULL,
                                   capture_output=True, text=True, timeout=20, check=False)
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the loopback sshd did not accept the test key within 20 s: ssh said "
                            f"{probe.stderr.strip()[-300:]!r}; sshd log: {log_path.read_text().strip()[-500:]!r}")
            time.sleep(0.2)
        yield LoopbackSshd(port, str(config), alias, wrong_alias, root)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


_FAKE_ADB = '''#!{python}
"""A fake adb: one device, {serial!r}, whose filesystem is this machine's; "shell" runs sh -c."""
import json, os, shutil, signal, subprocess, sys, time

SERIAL, LOG, GONE = {serial!r}, {log!r}, {gone!r}


def copy(src, dst):
    if dst.endswith("/") or os.path.isdir(dst):
        dst = os.path.join(dst, os.path.basename(src.rstrip("/")))
    if os.path.isdir(src):
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        shutil.copyfile(src, dst)
    return 0


def main(argv):
    with open(LOG, "a") as fh:
        fh.write(json.dumps(["adb", *argv]) + "\\n")
    serial = None
    if argv[:1] == ["-s"]:
        if len(argv) < 2:
            sys.stderr.write("adb: -s requires an argument\\n")
            return 1
        serial, argv = argv[1], argv[2:]
    if not argv:
        sys.stderr.write("adb: no command\\n")
        return 1
    cmd, args = argv[0], argv[1:]
    gone = os.path.exists(GONE)
    if cmd == "devices":
        print("List of devices attached")
        if not gone:
            print(SERIAL + "\\tdevice")
        print()
        return 0
    if gone or (serial is not None and serial != SERIAL):
        if serial is None:
            sys.stderr.write("adb: error: failed to get feature set: no devices/emulators found\\n")
        else:
            sys.stderr.write("error: device '%s' not found\\n" % serial)
        return 1
    if cmd == "shell":
        child = subprocess.Popen(["sh", "-c", " ".join(args)], start_new_session=True)
        while True:
            try:
                code = child.wait(timeout=0.1)
                return code if code >= 0 else 128 - code
            except subprocess.TimeoutExpired:
                pass
            if os.path.exists(GONE):
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                child.wait()
                sys.stderr.write("error: closed\\n")
                return 1
    if cmd in ("push", "pull") and len(args) == 2:
        try:
            return copy(*args)
        except OSError as exc:
            sys.stderr.write("adb: error: %s failed: %s\\n" % (cmd, exc))
            return 1
    sys.stderr.write("adb: unknown command %s\\n" % cmd)
    return 1


sys.exit(main(sys.argv[1:]))
'''


@dataclasses.dataclass
class FakeAdb:
    """A fake ``adb`` first on PATH: one device whose filesystem is ``device_root`` (and the rest of this machine)."""

    bin_dir: Path
    device_root: Path
    serial: str
    log: Path  # one JSON argv per invocation
    gone_marker: Path

    def disappear(self) -> None:
        """The device vanishes: running shells end with "error: closed", new commands find no device."""
        self.gone_marker.touch()

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]


@pytest.fixture
def fake_adb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeAdb:
    root = tmp_path / "fake-adb"
    bin_dir, device_root = root / "bin", root / "device"
    bin_dir.mkdir(parents=True)
    device_root.mkdir()
    fake = FakeAdb(bin_dir, device_root, "emulator-5554", root / "adb-calls.jsonl", root / "device-gone")
    script = bin_dir / "adb"
    script.write_text(_FAKE_ADB.format(python=sys.executable, serial=fake.serial, log=str(fake.log),
                                       gone=str(fake.gone_marker)))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return fake


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """A module whose tests evaluate hundreds of images in-process: one thread for torch and, through it, the
    runtimes (export/quantization/step.py: run_artifact), so a worker never oversubscribes the 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
