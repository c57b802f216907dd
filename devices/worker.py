"""The measurement worker: loads one artifact in its runtime and times it, in its own process.

Run as one self-contained file (standard library + numpy + the runtime it measures; no edgevit import
except for the PyTorch-eager baseline): ``devices/worker_bundle.py`` writes this file with the backends'
session modules (``export/backends/<name>/session.py``) bundled in, and that file is what the local
harness runs and what the remote protocol pushes, with the artifact and the inputs, to another machine
(docs in ``devices/remote.py``). Imported from edgevit (the in-process probe), it imports those modules
from the backends instead. Three modes:

* ``python worker.py serve`` — JSON lines on stdin/stdout; the local harness keeps one worker per
  configuration alive and interleaves timed blocks between them (A B A B ...).
* ``python worker.py run CONFIG.json OUT.json`` — one configuration end to end (load, first
  inference, warm-up, timed runs, optional profile) into one JSON file.
* ``python worker.py probe`` — what this machine can run (CPU, flags, runtimes, providers, devices) as
  one JSON line: the devices table of a remote machine is decided from it.

``serve`` is also what a remote device runs, over ssh or adb (``devices/remote.py``).

A config is a JSON object: ``runtime`` (a key of :data:`SESSIONS`: each backend's runtime and its int8
GEMM probe ``gemm-int8:<runtime>``, and torch, gemm, fake), ``artifact`` (path), ``inputs`` (an .npz
whose arrays are the positional inputs, in ``arr_0..`` order), ``threads``, ``options`` (runtime-specific:
providers, delegate, device, hint, inference precision, compute units) and ``profile`` (bool). Times are
in milliseconds, measured with ``perf_counter``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType
from typing import Any, Callable

try:
    import numpy as np
except ImportError:  # `probe` still answers (and says numpy is missing); every other mode needs it
    np = None  # type: ignore[assignment]

PROTOCOL = 1  # bump when the JSON messages change; the harness checks it


def package_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def peak_rss_mb() -> float:
    """Peak resident set size of this process since it started (its exec).

    Linux/Android: ``VmHWM`` of /proc/self/status, which belongs to the current address space.
    ``ru_maxrss`` is not used there: it survives exec and so includes the parent's pages at fork
    time (a worker forked from a 400 MB harness would report 400 MB). Elsewhere ``ru_maxrss``
    (bytes on macOS).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if platform.system() == "Darwin" else rss / 1024


def load_inputs(path: str) -> list[np.ndarray]:
    with np.load(path) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


# --- sessions: the PyTorch baseline, the GEMM probe, the harness's fake (the backends' come below) ---

class Session:
    """One loaded artifact: ``run(inputs)``, ``info`` (versions, threads, precision as reported).

    The backends' session classes (``export/backends/<name>/session.py``) have the same interface
    without deriving from this class: they are self-contained files of their own."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.options: dict[str, Any] = config.get("options", {})
        self.threads = int(config.get("threads") or os.cpu_count() or 1)
        self.info: dict[str, Any] = {"threads": self.threads}

    def run(self, inputs: list[np.ndarray]) -> Any:
        raise NotImplementedError

    def profile(self) -> list[dict[str, Any]]:
        """Per-op times of the runs since loading (profiling enabled at load), top first."""
        return []

    def compute_precision(self, inputs: list[np.ndarray]) -> str:
        """The precision the matrix multiplies ran in (fp32, fp16, bf16, int8, mixed or unknown): the roofline
        compares a run with the GEMM bound of *that* precision, not of the one asked for. Called once
        after the first inference, outside the timed load."""
        return "unknown"


def top_ops(totals: dict[str, float], counts: dict[str, int], runs: int, limit: int = 15,
            kinds: dict[str, str] | None = None, gemms: set[str] | None = None) -> list[dict[str, Any]]:
    """Aggregate per op type: ms per inference, share of the profiled time and ``kind`` ("int8" integer
    kernels, "convert" quantize/dequantize/cast/reorder, "float": ``kinds[op]``, default float), largest
    first. The ops past ``limit`` are folded into one "(other <kind> ops)" row per kind at the end, so
    the per-kind sums (:func:`profile_kinds`) cover the whole profile. ``gemm`` marks the ops in ``gemms``
    (matrix-multiplying kernels: the bench compares their time with the GEMM bound); they fold apart."""
    whole, per = sum(totals.values()) or 1.0, max(runs, 1)
    rows = sorted(({"op": op, "ms_per_run": ms / per, "share": ms / whole, "calls_per_run": counts[op] / per,
                    "kind": (kinds or {}).get(op, "float"), "gemm": op in (gemms or ())} for op, ms in totals.items()),
                  key=lambda r: -r["ms_per_run"])
    folded: dict[tuple[str, bool], dict[str, Any]] = {}
    for row in rows[limit:]:
        label = f"(other {row['kind']} {'matmul/conv ' if row['gemm'] else ''}ops)"
        into = folded.setdefault((row["kind"], row["gemm"]), {"op": label, "ms_per_run": 0.0, "share": 0.0,
                                                              "calls_per_run": 0.0, "kind": row["kind"],
                                                              "gemm": row["gemm"]})
        for key in ("ms_per_run", "share", "calls_per_run"):
            into[key] += row[key]
    return rows[:limit] + sorted(folded.values(), key=lambda r: -r["ms_per_run"])


def profile_kinds(profile: list[dict[str, Any]]) -> dict[str, float]:
    """ms per inference of each op kind (int8 / convert / float) in a profile from :func:`top_ops`,
    largest first; rows without a kind count as float."""
    totals: dict[str, float] = {}
    for row in profile:
        kind = row.get("kind", "float")
        totals[kind] = totals.get(kind, 0.0) + row["ms_per_run"]
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def _built_model(options: dict[str, Any]) -> Any:
    """``options["builder"]`` ("module:function", found in ``options["builder_path"]``) called with the options."""
    module_name, _, function = options["builder"].partition(":")
    sys.path.insert(0, os.path.abspath(options.get("builder_path") or "."))
    return getattr(__import__(module_name, fromlist=[function]), function)(options)


class TorchEagerSession(Session):
    """The PyTorch eager baseline: the zoo model rebuilt here (same name, input size and seed).

    Option ``builder: "module:function"`` (with ``builder_path``, the folder that module is in) times the
    model ``function(options)`` returns instead: code outside edgevit, e.g. the benchmarks' floors.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        import torch

        torch.set_num_threads(self.threads)
        source = self.options.get("pythonpath")
        if source:  # a remote device: edgevit's model code came as a zip beside this file, and takes precedence
            sys.path.insert(0, os.path.abspath(source))
            self.info["edgevit_source"] = source
        from edgevit.export.subject import prepare_subject

        opts = self.options
        seed = int(opts.get("seed", 0))
        if opts.get("builder"):
            self.model = _built_model(opts).eval()
        else:
            # a reference (Hugging Face folder, module:factory) comes with its shape; the values do not matter,
            # the timed inputs are the saved batch
            shape = opts.get("input_shape")
            example = torch.zeros(shape) if shape else None
            self.model = prepare_subject(opts["model"], example, opts.get("input_size"), None, seed).model
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[opts.get("precision", "fp32")]
        if self.dtype != torch.float32:
            self.model = self.model.to(self.dtype)
        self.torch = torch
        self.profiler = None
        self.runs = 0
        if config.get("profile"):
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()
        self.info |= {"runtime": "torch-eager", "version": torch.__version__,
                      "precision": str(self.dtype).replace("torch.", "")}

    def compute_precision(self, inputs: list[np.ndarray]) -> str:
        return "bf16" if self.dtype == self.torch.bfloat16 else "fp32"

    def run(self, inputs: list[np.ndarray]) -> Any:
        self.runs += 1
        with self.torch.inference_mode():
            return self.model(*(self.torch.from_numpy(x).to(self.dtype) if x.dtype.kind == "f"
                                else self.torch.from_numpy(x) for x in inputs))

    def profile(self) -> list[dict[str, Any]]:
        if self.profiler is None:
            return []
        self.profiler.__exit__(None, None, None)
        totals = {e.key: e.self_cpu_time_total / 1e3 for e in self.profiler.key_averages()}
        counts = {e.key: e.count for e in self.profiler.key_averages()}
        return top_ops(totals, counts, self.runs)


class GemmSession(Session):
    """The roofline probe: one square matrix multiply on all threads (torch, else numpy/BLAS).
    ``info['flop']`` is 2 n^3; the harness divides it by the median time.

    ``n`` (default 2048) is an upper limit: where this precision has no fast kernel (bf16/fp16 on a CPU
    without bf16/fp16 arithmetic, where torch emulates at ~1 GFLOP/s) a 2048 GEMM would take a minute per
    call, so n shrinks (multiples of 256, >= 256) until one call is estimated at <= ``max_call_s``.
    ``info['native']`` says whether the CPU flags show arithmetic units for the precision.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        n_max = int(self.options.get("n", 2048))
        self.precision = self.options.get("precision", "fp32")
        if self.precision not in ("fp32", "bf16", "fp16"):  # int8 has one probe per runtime: its INT8_GEMM session
            int8 = sorted(k for k in SESSIONS if k.startswith("gemm-int8:"))
            raise ValueError(f"the gemm probe measures fp32, bf16 or fp16, not {self.precision!r}"
                             + (f" (int8: runtime {' or '.join(int8)})" if int8 else ""))
        try:
            import torch

            torch.set_num_threads(self.threads)
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
            make: Callable[[int], Callable[[], Any]] = lambda k: _torch_mm(torch, k, dtype)
            engine = f"torch {torch.__version__}"
        except ImportError:
            if self.precision != "fp32":
                raise
            make = _numpy_mm
            engine = f"numpy {np.__version__}"
        n = gemm_size(make, n_max, float(self.options.get("max_call_s", 1.0)))
        self._call = make(n)
        self.info |= {"runtime": "gemm", "engine": engine, "n": n, "flop": 2 * n ** 3, "precision": self.precision,
                      "native": native_units(self.precision)}

    def run(self, inputs: list[np.ndarray]) -> Any:
        return self._call()

    def compute_precision(self, inputs: list[np.ndarray]) -> str:
        return self.precision


def _torch_mm(torch: Any, n: int, dtype: Any) -> Callable[[], Any]:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return lambda: torch.mm(a, b)


def _numpy_mm(n: int) -> Callable[[], Any]:
    a, b = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
    return lambda: a @ b


def gemm_size(make: Callable[[int], Callable[[], Any]], n_max: int, max_call_s: float, probe: int = 256) -> int:
    """The largest n (n_max, else a multiple of 256 >= 256) whose GEMM is estimated at <= max_call_s,
    from the best of three timed calls at ``probe`` (cubic scaling)."""
    if n_max <= probe:
        return n_max
    call = make(probe)
    call()
    best = min(_timed(call) for _ in range(3))
    for n in [n_max] + list(range(n_max // 256 * 256, probe - 1, -256)):
        if best * (n / probe) ** 3 <= max_call_s:
            return n
    return probe


def _timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


#: CPU flags of integer dot-product units (8-bit x 8-bit products summed into 32 bits in one instruction: x86
#: VNNI and AMX, Arm dotprod and i8mm). Without them an int8 GEMM runs on 16-bit multiply-adds (x86 AVX2
#: vpmaddubsw, Arm NEON widening multiplies), often no faster than fp32 FMAs.
INTEGER_UNIT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
# CPU feature flags that mean arithmetic units for a precision (x86 /proc/cpuinfo, Arm Linux "Features").
_NATIVE_FLAGS = {"fp32": None, "bf16": ("avx512_bf16", "amx_bf16", "bf16"), "fp16": ("avx512_fp16", "amx_fp16", "fphp"),
                 "int8": INTEGER_UNIT_FLAGS}


def integer_units(flags: list[str] | None) -> list[str]:
    """The integer dot-product units among CPU ``flags`` (a machine's ``cpu.flags``), in INTEGER_UNIT_FLAGS order."""
    return [f for f in INTEGER_UNIT_FLAGS if f in (flags or ())]


def integer_units_text(flags: list[str] | None) -> str:
    """One phrase for a report: "avx512_vnni, amx_int8", or why there are none ("unknown" without flags)."""
    if not flags:
        return "unknown (no CPU flags)"
    units = integer_units(flags)
    if units:
        return ", ".join(units)
    if "avx2" in flags:
        return "none (AVX2 only: int8 runs on 16-bit multiply-adds)"
    if "asimd" in flags:
        return "none (NEON without dotprod: int8 runs on 16-bit widening multiply-adds)"
    return "none"


def native_units(precision: str, cpuinfo: str | None = None) -> bool | None:
    """True/False when the CPU flags say whether ``precision`` has arithmetic units; None if unknown
    (no /proc/cpuinfo, e.g. macOS). fp32 is always native."""
    flags = _NATIVE_FLAGS.get(precision)
    if flags is None:
        return True
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as fh:
                cpuinfo = fh.read()
        except OSError:
            return None
    present = {w for line in cpuinfo.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
               for w in line.split(":", 1)[1].split()}
    return any(f in present for f in flags)


class FakeSession(Session):
    """For the harness's own tests: sleeps, and crashes, hangs or is SIGKILLed where told (load / first / run:K)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.calls = 0
        self._maybe_fail("load")
        self.info |= {"runtime": "fake", "version": "0", "precision": self.options.get("precision", "fp32")}

    def _maybe_fail(self, when: str) -> None:
        if self.options.get("crash") == when:
            os._exit(3)  # like a segfaulting converter: no exception, no cleanup
        if self.options.get("hang") == when:
            time.sleep(3600)
        if self.options.get("sigkill") == when:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)

    def compute_precision(self, inputs: list[np.ndarray]) -> str:
        return self.options.get("compute_precision", self.info["precision"])

    def run(self, inputs: list[np.ndarray]) -> Any:
        self.calls += 1
        self._maybe_fail("first" if self.calls == 1 else f"run:{self.calls}")
        time.sleep(float(self.options.get("ms", 1.0)) / 1e3)
        return inputs

    def profile(self) -> list[dict[str, Any]]:
        return top_ops({"Sleep": self.calls * float(self.options.get("ms", 1.0))}, {"Sleep": self.calls}, self.calls)


# --- the backends' sessions ------------------------------------------------------------------------

#: backend name -> the source of its session module; filled in by devices/worker_bundle.py (empty when
#: this file is imported from edgevit, which then imports those modules from the backends)
BUNDLED: dict[str, str] = {}


def session_modules() -> list[ModuleType]:
    """The backends' session modules, in the registry's order. Each declares ``RUNTIME`` (its key here
    and in a machine's facts), ``SESSIONS`` (runtime key -> class, instances duck-typed like
    :class:`Session`), ``PACKAGES`` (``(module, package, import it)`` to probe) and optionally
    ``probe_facts()`` (``facts[RUNTIME]``)."""
    if not BUNDLED:
        from edgevit.export.backends import BACKENDS

        return [backend.module("session") for backend in BACKENDS.values()]
    return [_bundled_module(name, source) for name, source in BUNDLED.items()]


def _bundled_module(name: str, source: str) -> ModuleType:
    import linecache

    filename = f"<bundled export/backends/{name}/session.py>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # for tracebacks
    module = ModuleType(f"edgevit_worker_{name}_session")
    module.__file__ = filename
    sys.modules[module.__name__] = module
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


SESSION_MODULES = session_modules()
SESSIONS: dict[str, Callable[[dict[str, Any]], Any]] = {
    **{key: cls for module in SESSION_MODULES for key, cls in module.SESSIONS.items()},
    "torch": TorchEagerSession, "gemm": GemmSession, "fake": FakeSession,
}


# --- the measurement protocol ----------------------------------------------------------------------

class Worker:
    """One configuration: ``load`` (load + first inference), ``run`` blocks of timed inferences."""

    def __init__(self) -> None:
        self.session: Session | None = None
        self.inputs: list[np.ndarray] = []

    def load(self, config: dict[str, Any]) -> dict[str, Any]:
        runtime = config.get("runtime")
        if runtime not in SESSIONS:
            raise ValueError(f"unknown runtime {runtime!r}; one of {sorted(SESSIONS)}")
        self.inputs = load_inputs(config["inputs"]) if config.get("inputs") else []
        start = time.perf_counter()
        self.session = SESSIONS[runtime](config)
        load_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        self.session.run(self.inputs)
        first_ms = (time.perf_counter() - start) * 1e3
        try:
            self.session.info["compute_precision"] = self.session.compute_precision(self.inputs)
        except Exception as exc:  # informative only: it must not fail the measurement
            self.session.info["compute_precision"] = f"unknown ({type(exc).__name__})"
        return {"load_ms": load_ms, "first_ms": first_ms, "info": self.session.info,
                "platform": _platform()}

    def run(self, runs: int, warmup: int = 0, budget_s: float | None = None, warmup_s: float = 0.0) -> dict[str, Any]:
        """Untimed inferences (``warmup`` of them, and more until ``warmup_s`` seconds have passed), then ``runs``
        timed ones (stopping early once ``budget_s`` is spent)."""
        assert self.session is not None, "load first"
        deadline, done = time.perf_counter() + warmup_s, 0
        while done < warmup or time.perf_counter() < deadline:
            self.session.run(self.inputs)
            done += 1
        times: list[float] = []
        deadline = None if budget_s is None else time.perf_counter() + budget_s
        for _ in range(runs):
            start = time.perf_counter()
            self.session.run(self.inputs)
            times.append((time.perf_counter() - start) * 1e3)
            if deadline is not None and time.perf_counter() > deadline:
                break
        return {"times_ms": times}

    def finish(self) -> dict[str, Any]:
        profile = self.session.profile() if self.session is not None and self.session.config.get("profile") else []
        return {"peak_rss_mb": peak_rss_mb(), "profile": profile}


def _platform() -> dict[str, Any]:
    return {"system": platform.system(), "machine": platform.machine(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "numpy": np.__version__, "protocol": PROTOCOL}


def serve(stdin: Any = None, stdout: Any = None) -> None:
    """JSON-lines loop: {"cmd": "load", "config": {...}} | {"cmd": "run", ...} | {"cmd": "finish"}.

    The protocol owns the process's real stdout; fd 1 is pointed at stderr first, so whatever a
    runtime prints (delegate banners, warnings) cannot corrupt a reply. The end of stdin ends the
    process at once, even mid-inference: over ssh or adb that is how a harness that was killed, timed
    out or lost the connection takes its worker with it (nothing keeps running on the device).
    """
    lines = _stdin_lines(stdin or sys.stdin)
    if stdout is None:
        stdout = _own_stdout()
    worker = Worker()
    for line in lines:
        msg = json.loads(line)
        try:
            if msg["cmd"] == "load":
                reply = worker.load(msg["config"])
            elif msg["cmd"] == "run":
                reply = worker.run(int(msg["runs"]), int(msg.get("warmup", 0)), msg.get("budget_s"),
                                   float(msg.get("warmup_s", 0.0)))
            elif msg["cmd"] == "finish":
                reply = worker.finish()
            else:
                raise ValueError(f"unknown command {msg['cmd']!r}")
            reply["ok"] = True
        except Exception as exc:  # reported to the harness as this configuration's error
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}
        stdout.write(json.dumps(reply) + "\n")
        stdout.flush()
        if msg.get("cmd") == "finish":
            return


def _own_stdout() -> Any:
    """The real stdout for the protocol's messages; fd 1 (and print) go to stderr from now on."""
    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return stdout


def _stdin_lines(stdin: Any) -> Any:
    """Lines of ``stdin`` read by a thread; at end of input the process exits (see :func:`serve`)."""
    import queue
    import threading

    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in stdin:
            lines.put(line)
        lines.put(None)
        if stdin is sys.stdin:
            os._exit(0)  # the harness is gone: stop whatever is running (a queued "finish" was already read)

    threading.Thread(target=read, daemon=True).start()
    while True:
        line = lines.get()
        if line is None:
            return
        yield line


# --- what this machine can run (edgevit devices, local or remote) --------------------------------

#: CPU feature flags that decide which kernels a runtime can use (x86 /proc/cpuinfo "flags", Arm "Features").
CPU_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_int8", "amx_bf16", "asimd", "asimdhp", "asimddp", "fphp", "bf16", "i8mm", "sve", "sve2", "sme")


def probe() -> dict[str, Any]:
    """Facts about this machine for the devices table: CPU, runtimes and what each can reach.

    Every reading is guarded: a runtime that fails to import is recorded with its error, never raised.
    """
    facts: dict[str, Any] = {"protocol": PROTOCOL, "platform": {
        "system": platform.system(), "machine": platform.machine(), "python": platform.python_version(),
        "executable": sys.executable, "android": _is_android()}}
    facts["cpu"] = cpu_facts()
    facts["accelerator_nodes"] = _accelerator_nodes()
    # runtimes are imported (a broken install shows); torch (and what a backend marks so) is only looked up:
    # importing it costs seconds and tells the devices table nothing more
    packages = [("numpy", "numpy", True), ("torch", "torch", False)]
    packages += [entry for module in SESSION_MODULES for entry in module.PACKAGES]
    facts["packages"] = {name: _package_state(module, name, load) for module, name, load in packages}
    for module in SESSION_MODULES:  # what each runtime reaches: providers, devices, delegates
        if hasattr(module, "probe_facts"):
            facts[module.RUNTIME] = _guarded(module.probe_facts)
    return facts


def _package_state(module: str, package: str, load: bool = True) -> dict[str, Any]:
    """{"version": ...} when ``module`` imports (or, without ``load``, is found), else {"missing": True}
    or {"error": one line}."""
    import importlib
    import importlib.util

    try:
        if not load:
            return {"version": package_version(package)} if importlib.util.find_spec(module) else {"missing": True}
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module or (exc.name or "").split(".")[0] == module:
            return {"missing": True}
        return {"error": f"ModuleNotFoundError: {exc}".splitlines()[0][:300]}
    except Exception as exc:  # a broken install (missing shared library, ABI mismatch) is reported, not raised
        return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
    return {"version": package_version(package)}


def _guarded(read: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return read()
    except Exception as exc:  # the runtime is missing or broken: _package_state says which
        return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}


def cpu_facts() -> dict[str, Any]:
    """This machine's CPU: model, cores, and the CPU_FLAGS it has (the ones that decide kernels)."""
    text = ""
    try:
        with open("/proc/cpuinfo") as fh:
            text = fh.read()
    except OSError:
        pass
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or fields.get("Hardware") or fields.get("Model") or _sysctl_cpu() \
        or platform.processor()
    present = set((fields.get("flags") or fields.get("Features") or "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {"model": model, "cores": os.cpu_count(), "usable_cores": usable,
            "flags": [f for f in CPU_FLAGS if f in present], "flags_known": bool(present)}


def _sysctl_cpu() -> str:
    if platform.system() != "Darwin":
        return ""
    import subprocess

    try:
        return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _accelerator_nodes() -> dict[str, list[str]]:
    """Device nodes that mean an NPU or a GPU is exposed to user space (names only; no driver is opened)."""
    import glob

    found = {"npu": sorted(glob.glob("/dev/accel/accel*")),
             "gpu": sorted(glob.glob("/dev/dri/renderD*") + glob.glob("/dev/kgsl-3d0") + glob.glob("/dev/mali*")
                           + glob.glob("/dev/nvhost-gpu") + glob.glob("/dev/nvgpu/igpu0/ctrl"))}
    return {kind: nodes for kind, nodes in found.items() if nodes}


def _is_android() -> bool:
    return "ANDROID_ROOT" in os.environ or os.path.exists("/system/build.prop")


def run_probe() -> int:
    """``worker.py probe``: the facts as one JSON line on the real stdout (runtimes' chatter goes to stderr)."""
    out = _own_stdout()
    out.write(json.dumps(probe()) + "\n")
    out.flush()
    return 0


def run_once(config_path: str, out_path: str) -> int:
    """The remote protocol's one-shot measurement: config file in, result file out (written atomically)."""
    with open(config_path) as fh:
        config = json.load(fh)
    worker = Worker()
    result: dict[str, Any] = {"protocol": PROTOCOL, "config": config}
    try:
        result |= worker.load(config)
        result["warmup"] = int(config.get("warmup", 3))
        result |= worker.run(int(config.get("runs", 20)), result["warmup"], config.get("budget_s"))
        result |= worker.finish()
        result["ok"] = True
    except Exception as exc:
        result |= {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}
    tmp = out_path + ".part"
    with open(tmp, "w") as fh:
        json.dump(result, fh)
    os.replace(tmp, out_path)
    return 0 if result["ok"] else 1


def main(argv: list[str]) -> int:
    if argv == ["probe"]:
        return run_probe()
    if np is None:
        sys.stderr.write("edgevit worker: numpy is not installed for this python\n")
        return 3
    if argv[:1] == ["serve"]:
        serve()
        return 0
    if len(argv) == 3 and argv[0] == "run":
        return run_once(argv[1], argv[2])
    sys.stderr.write("usage: worker.py probe | worker.py serve | worker.py run CONFIG.json OUT.json\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
