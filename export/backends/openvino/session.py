"""OpenVINO: the one session that runs IR (.xml + .bin) artifacts, for parity (``edgevit export``) and the bench worker.

Self-contained on purpose (standard library + numpy + openvino; no edgevit import):
``devices/worker_bundle.py`` bundles this file into the worker that is pushed to remote machines. What
the worker reads here by name (see ``export/backends/onnx/session.py``): ``RUNTIME``, ``SESSIONS``,
``PACKAGES``, ``probe_facts()``, ``describe()``, ``INT8_GEMM`` (the int8 roofline probe's key in ``SESSIONS``).
"""

from __future__ import annotations

import os
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    import numpy as np
except ImportError:  # the worker's probe still answers without numpy
    np = None  # type: ignore[assignment]

RUNTIME = "openvino"
PACKAGES = (("openvino", "openvino", True),)
INT8_GEMM = "gemm-int8:openvino"


def probe_facts() -> dict[str, Any]:
    """The devices OpenVINO sees (CPU, GPU.0, NPU...) and their full names."""
    import openvino as ov

    core = ov.Core()
    names = {}
    for device in core.available_devices:
        try:
            names[device] = str(core.get_property(device, "FULL_DEVICE_NAME"))
        except Exception:  # some plugins refuse properties without their driver; the name is informative only
            names[device] = ""
    return {"devices": list(core.available_devices), "names": names}


def describe(facts: dict[str, Any]) -> str | None:
    devices = facts.get(RUNTIME, {}).get("devices")
    return f"OpenVINO devices: {', '.join(devices)}" if devices else None


def package_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
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


class OpenVINOSession:
    """One compiled IR: ``run(inputs)`` (the outputs in order), ``info``, ``profile()``, ``compute_precision()``.

    ``config``: ``artifact``, ``threads``, ``options`` (``device`` CPU/GPU/NPU, ``inference_precision``
    f32/bf16/f16, ``hint``: the performance hint, LATENCY by default, None to leave it unset), ``profile``;
    ``parity`` (see :meth:`for_parity`) gives ``info`` as export manifests record it.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        import openvino as ov

        self.config = config
        self.options: dict[str, Any] = config.get("options", {})
        self.threads = int(config.get("threads") or os.cpu_count() or 1)
        device = self.options.get("device", "CPU")
        requested = self.options.get("inference_precision", "f32")
        hint = self.options.get("hint", "LATENCY")
        props = {"INFERENCE_PRECISION_HINT": requested, "INFERENCE_NUM_THREADS": self.threads}
        if hint is not None:
            props["PERFORMANCE_HINT"] = hint
        if config.get("profile"):
            props["PERF_COUNT"] = True
        self.compiled = ov.Core().compile_model(config["artifact"], device, props)
        self.request = self.compiled.create_infer_request()
        reported = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # e.g. "f32", "bf16"
        self.info: dict[str, Any] = {"threads": self.threads, "runtime": RUNTIME,
                                     "version": package_version("openvino"), "device": device}
        if config.get("parity"):
            self.info |= {"inference_precision_requested": requested, "inference_precision_reported": reported}
        else:
            self.info |= {"hint": str(self.compiled.get_property("PERFORMANCE_HINT")),
                          "inference_precision_requested": requested, "precision": reported}

    @classmethod
    def for_parity(cls, path: str, threads: int | None = None) -> "OpenVINOSession":
        """The session ``edgevit export`` checks outputs with: the CPU plugin, inference precision forced to f32."""
        return cls({"artifact": path, "threads": threads, "parity": True,
                    "options": {"device": "CPU", "inference_precision": "f32", "hint": None}})

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(inputs)
        return [np.asarray(result[o]) for o in self.compiled.outputs]

    def compute_precision(self, inputs: list[np.ndarray]) -> str:
        """What the matrix multiplies ran in, from the exec types of the compiled model's MatMul /
        FullyConnected / Convolution nodes (:func:`matmul_precisions`: int8 IRs run brgemm_*_I8 kernels,
        NNCF's compressed weights run float kernels); the inference precision where the runtime model
        names none (a plugin without exec types)."""
        counts, compressed = matmul_precisions(self.compiled.get_runtime_model())
        if not counts:
            return {"f32": "fp32", "f16": "fp16", "bf16": "bf16"}.get(self.info["precision"], "unknown")
        self.info["matmul_precisions"] = counts
        if compressed:
            self.info["compressed_weights"] = compressed
        return next(iter(counts)) if len(counts) == 1 else "mixed"

    def profile(self) -> list[dict[str, Any]]:
        """Per-op times of the last inference (PERF_COUNT enabled at load), top first, with each row's kind."""
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        kinds: dict[str, str] = {}
        for info in self.request.get_profiling_info():  # the last inference's counters
            if info.status.name != "EXECUTED":
                continue
            key = f"{info.node_type} ({info.exec_type})"
            totals[key] = totals.get(key, 0.0) + info.real_time.total_seconds() * 1e3
            counts[key] = counts.get(key, 0) + 1
            kinds[key] = op_kind(info.node_type, info.exec_type)
        return top_ops(totals, counts, 1, kinds=kinds,
                       gemms={key for key in totals if key.startswith(MATMUL_LAYERS)})


#: CPU-plugin node types that only convert precision or layout (a FakeQuantize fused into a Subgraph shows
#: as that Subgraph, a float kernel)
CONVERT_NODES = frozenset({"Reorder", "Convert", "FakeQuantize", "FakeConvert"})
#: runtime-model layer types that multiply matrices (FullyConnectedCompressed etc. start like FullyConnected)
MATMUL_LAYERS = ("FullyConnected", "MatMul", "Convolution", "GroupConvolution", "Deconvolution")


def exec_precision(exec_type: str) -> str | None:
    """The precision an exec type names by its suffix ("brgemm_avx512_I8" -> int8, "gemm_mlas_f32" -> fp32,
    "brgemm_avx512_amx_bf16" -> bf16); None when it names none."""
    suffix = exec_type.rsplit("_", 1)[-1].lower()
    return {"i8": "int8", "u8": "int8", "f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(suffix)


def op_kind(node_type: str, exec_type: str) -> str:
    """A profiled node's kind: "convert" (Reorder, Convert, FakeQuantize), "int8" (an I8/U8 exec type) or "float"."""
    if node_type in CONVERT_NODES:
        return "convert"
    return "int8" if exec_precision(exec_type) == "int8" else "float"


def matmul_precisions(runtime_model: Any) -> tuple[dict[str, int], dict[str, int]]:
    """Per precision, how many matrix-multiplying nodes of a compiled model's runtime graph ran in it (their
    ``primitiveType``'s suffix), and per stored weight type, how many of them ran a float kernel on
    low-precision weights (``runtimePrecision`` i8/u8/i4/u4 with a float exec type: NNCF's compressed weights)."""
    counts: dict[str, int] = {}
    compressed: dict[str, int] = {}
    for op in runtime_model.get_ordered_ops():
        rt = op.get_rt_info()
        if not _rt(rt, "layerType").startswith(MATMUL_LAYERS):
            continue
        found = exec_precision(_rt(rt, "primitiveType"))
        if found is None:
            continue
        counts[found] = counts.get(found, 0) + 1
        stored = _rt(rt, "runtimePrecision")
        if found != "int8" and stored in ("i8", "u8", "i4", "u4"):
            compressed[stored] = compressed.get(stored, 0) + 1
    return counts, compressed


def _rt(rt_info: Any, key: str) -> str:
    """One runtime-model rt_info entry as text ("" when absent)."""
    return rt_info[key].astype(str) if key in rt_info else ""


# --- the int8 roofline probe -------------------------------------------------------------------------

_PROBE_N = 256


class OpenVINOInt8Gemm:
    """The int8 roofline probe: OpenVINO's int8 matmul of an n x n square on ``threads`` threads
    (``info["flop"]`` = 2 n^3 integer ops); ``run`` ignores its inputs.

    The graph is what NNCF writes for a Linear layer: A (f32 holding the integers 0..127) -> FakeQuantize
    (256 levels over [0, 255]: exact on those values) -> MatMul with B^T stored as an i8 constant times a
    per-output-channel scale of 1. The CPU plugin's low-precision transformations make it a u8 x i8
    FullyConnected kernel; the exec type is read back from the compiled model (``info["exec_type"]``) and
    the probe refuses to run when it is not an integer one. ``options``: ``n`` (default 2048, shrunk like
    the float probe's until a call is estimated at <= ``max_call_s``, default 1.0 s), ``device`` (CPU).
    With |a| <= 127 and |b| <= 64 the f32 output is exact for n <= 2048: ``self.a @ self.b`` in int32.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.options: dict[str, Any] = config.get("options", {})
        self.threads = int(config.get("threads") or os.cpu_count() or 1)
        self.device = self.options.get("device", "CPU")
        n_max = int(self.options.get("n", 2048))
        probe = min(_PROBE_N, n_max)
        n = _gemm_size(_best_time(_Int8MatMul(probe, self.threads, self.device)), probe, n_max,
                       float(self.options.get("max_call_s", 1.0)))
        self.gemm = _Int8MatMul(n, self.threads, self.device)
        self.a, self.b = self.gemm.a, self.gemm.b
        if self.gemm.precision != "int8":
            raise RuntimeError(f"OpenVINO ran the int8 GEMM probe as {self.gemm.exec_type or 'an unnamed kernel'} "
                               f"on {self.device}: no int8 matmul kernel here")
        self.info: dict[str, Any] = {
            "threads": self.threads, "runtime": "gemm", "precision": "int8", "n": n, "flop": 2 * n ** 3,
            "engine": f"openvino {package_version('openvino')} {self.gemm.layer} {self.gemm.exec_type} "
                      f"(u8 x i8, FakeQuantize + i8 weights)",
            "device": self.device, "exec_type": self.gemm.exec_type, "native": native_int8()}

    def run(self, inputs: list[np.ndarray]) -> np.ndarray:
        return self.gemm()

    def compute_precision(self, inputs: list[np.ndarray]) -> str:
        return "int8"

    def profile(self) -> list[dict[str, Any]]:
        return []


class _Int8MatMul:
    """One compiled FakeQuantize -> MatMul(i8 weights) model of n x n operands; calling it runs it.
    ``layer``, ``exec_type`` and ``precision``: what the plugin made of the MatMul."""

    def __init__(self, n: int, threads: int, device: str) -> None:
        import openvino as ov
        import openvino.opset13 as ops

        rng = np.random.default_rng(0)
        self.a = rng.integers(0, 128, (n, n)).astype(np.uint8)
        self.b = rng.integers(-64, 65, (n, n)).astype(np.int8)
        low, high = ops.constant(np.float32(0)), ops.constant(np.float32(255))
        a = ops.parameter([n, n], ov.Type.f32, name="A")
        weights = ops.multiply(ops.convert(ops.constant(np.ascontiguousarray(self.b.T)), ov.Type.f32),
                               ops.constant(np.ones((n, 1), np.float32)))
        matmul = ops.matmul(ops.fake_quantize(a, low, high, low, high, 256), weights, False, True)
        matmul.set_friendly_name("int8_gemm")
        props = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = ov.Core().compile_model(ov.Model([matmul], [a], "int8_gemm"), device, props)
        self.request = self.compiled.create_infer_request()
        self.feed = [self.a.astype(np.float32)]
        self.layer, self.exec_type = _kernel_of(self.compiled.get_runtime_model(), "int8_gemm")
        self.precision = exec_precision(self.exec_type)

    def __call__(self) -> np.ndarray:
        return self.request.infer(self.feed)[self.compiled.outputs[0]]


def _kernel_of(runtime_model: Any, name: str) -> tuple[str, str]:
    """(layer type, exec type) of the runtime node that holds the original node ``name``."""
    for op in runtime_model.get_ordered_ops():
        rt = op.get_rt_info()
        if name in _rt(rt, "originalLayersNames").split(","):
            return _rt(rt, "layerType"), _rt(rt, "primitiveType")
    return "?", ""


def _best_time(call: Any, times: int = 3) -> float:
    """Seconds of the fastest of ``times`` calls, after one untimed call."""
    call()
    best = float("inf")
    for _ in range(times):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def _gemm_size(best_s: float, probe: int, n_max: int, max_call_s: float) -> int:
    """The largest n (n_max, else a multiple of 256 >= ``probe``) whose GEMM, scaled cubically from
    ``best_s`` seconds at ``probe``, takes <= ``max_call_s`` (the rule of devices/worker.py's gemm_size)."""
    if n_max <= probe:
        return n_max
    for n in [n_max] + list(range(n_max // 256 * 256, probe - 1, -256)):
        if best_s * (n / probe) ** 3 <= max_call_s:
            return n
    return probe


#: CPU flags of integer dot-product units (as devices/worker.py's INTEGER_UNIT_FLAGS: this file is self-contained)
INTEGER_UNIT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def native_int8() -> bool | None:
    """Whether /proc/cpuinfo shows integer dot-product units; None where it cannot tell (no /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as fh:
            text = fh.read()
    except OSError:
        return None
    present = {w for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
               for w in line.split(":", 1)[1].split()}
    return any(f in present for f in INTEGER_UNIT_FLAGS)


SESSIONS = {RUNTIME: OpenVINOSession, INT8_GEMM: OpenVINOInt8Gemm}
