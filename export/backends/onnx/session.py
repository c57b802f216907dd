"""onnxruntime: the one session that runs .onnx artifacts, for parity (``edgevit export``) and the bench worker.

Self-contained on purpose (standard library + numpy + onnxruntime; onnx only to read an artifact's
precision; no edgevit import): ``devices/worker_bundle.py`` bundles this file into the worker that is
pushed to remote machines. What the worker reads here, by name:

- ``RUNTIME``: the worker's runtime key, also the key of :func:`probe_facts` in a machine's facts;
- ``SESSIONS``: runtime key -> session class (``cls(config)``: see ``devices/worker.py`` for the config);
- ``PACKAGES``: ``(module, package, import it)`` probed on every machine (``facts["packages"]``);
- ``probe_facts()``: this runtime's facts (its execution providers); ``describe(facts)``: the machine line;
- ``INT8_GEMM``: the key of the int8 roofline probe in ``SESSIONS`` (onnxruntime's own integer matmul).

A weight-only artifact (int8 weights behind DequantizeLinear, no activation quantizers) is loaded with
:data:`FOLD_WEIGHTS_CONFIG` (see :func:`session_config`): both the bench and parity run it the way a user should.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    import numpy as np
except ImportError:  # the worker's probe still answers without numpy
    np = None  # type: ignore[assignment]

RUNTIME = "onnxruntime"
PACKAGES = (("onnxruntime", "onnxruntime", True),)
PARITY_PROVIDER = "CPUExecutionProvider"
INT8_GEMM = "gemm-int8:onnxruntime"
# onnxruntime's constant folding leaves DequantizeLinear alone while its QDQ handling is on, so a Conv whose
# weight is DequantizeLinear(int8 constant) gets no pre-packed (NCHWc) kernel: measured 0.83x fp32 on
# MobileViT-v2. With QDQ handling off the DequantizeLinear of a constant folds to a float constant at load
# (same outputs to 4e-7) and the Conv is packed like fp32's. Only for graphs without activation quantizers:
# those need the QDQ fusions to run integer kernels.
FOLD_WEIGHTS_CONFIG = {"session.disable_quant_qdq": "1"}


def probe_facts() -> dict[str, Any]:
    import onnxruntime

    return {"providers": onnxruntime.get_available_providers()}


def describe(facts: dict[str, Any]) -> str | None:
    providers = facts.get(RUNTIME, {}).get("providers")
    return f"onnxruntime providers: {', '.join(providers)}" if providers else None


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


class OnnxRuntimeSession:
    """One loaded .onnx: ``run(inputs)`` (the outputs in order), ``info``, ``profile()``, ``compute_precision()``.

    ``config``: ``artifact``, ``threads``, ``options`` (``providers``, default the CPU provider),
    ``profile``; ``parity`` (see :meth:`for_parity`) gives ``info`` as export manifests record it.
    ``info["precision"]`` is what the artifact stores (fp32, fp16, "int8 (QDQ)", "w4 (MatMulNBits)", ...:
    :func:`stored_precision`); :meth:`compute_precision` what its matrix multiplies ran in.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        import onnxruntime as ort

        self.config = config
        self.options: dict[str, Any] = config.get("options", {})
        self.threads = int(config.get("threads") or os.cpu_count() or 1)
        parity = bool(config.get("parity"))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        if not parity:
            opts.inter_op_num_threads = 1
        if config.get("profile"):
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(os.path.dirname(os.path.abspath(config["artifact"])), "ort_profile")
        providers = self.options.get("providers", [PARITY_PROVIDER])
        # nbits_int8: MatMulNBits quantizing its activations (accuracy_level 4), an integer kernel
        precision, self.nbits_int8 = _onnx_precision(config["artifact"])
        self.session_config = session_config(precision)
        for key, value in self.session_config.items():
            opts.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(config["artifact"], opts, providers=providers)
        self.names = [i.name for i in self.session.get_inputs()]
        self.runs = 0
        self.info: dict[str, Any] = {"threads": self.threads, "runtime": RUNTIME,
                                     "version": package_version("onnxruntime")}
        if self.session_config:
            self.info["session_config"] = dict(self.session_config)
        if parity:
            self.info["provider"] = self.session.get_providers()[0]
        else:
            self.info |= {"providers": self.session.get_providers(), "precision": precision}

    @classmethod
    def for_parity(cls, path: str, threads: int | None = None) -> "OnnxRuntimeSession":
        """The session ``edgevit export`` checks outputs with: the CPU execution provider only."""
        return cls({"artifact": path, "threads": threads, "parity": True, "options": {"providers": [PARITY_PROVIDER]}})

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        self.runs += 1
        return list(self.session.run(None, dict(zip(self.names, inputs))))

    def compute_precision(self, inputs: list[np.ndarray]) -> str:
        """What the matrix multiplies ran in (the roofline's bound is that precision's GEMM): fp32 graphs are
        fp32; any other graph is read from one profiled inference (:func:`_ort_matmul_precisions`), whose
        counts per precision land in ``info["matmul_precisions"]``."""
        if self.info["precision"] == "fp32":
            return "fp32"
        counts = _ort_matmul_precisions(self.config["artifact"], self.session.get_providers(), self.threads,
                                        dict(zip(self.names, inputs)), self.nbits_int8, self.session_config)
        self.info["matmul_precisions"] = counts
        return one_precision(counts)

    def profile(self) -> list[dict[str, Any]]:
        """Per-op times of the runs since loading (profiling enabled at load), top first, with each op's kind."""
        path = self.session.end_profiling()
        if not path:
            return []
        events = _ort_kernel_events(path)
        os.remove(path)
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        for e in events:
            op = e.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + e.get("dur", 0) / 1e3
            counts[op] = counts.get(op, 0) + 1
        return top_ops(totals, counts, self.runs, kinds={op: op_kind(op, self.nbits_int8) for op in totals},
                       gemms={op for op in totals if op in GEMM_KERNELS})


# --- the int8 roofline probe -------------------------------------------------------------------------

#: MatMulInteger operand types (A x B) the probe tries; MLAS's fastest differs per CPU (u8 x s8 is its
#: x86 VNNI / AVX2 path, s8 x s8 and u8 x u8 its Arm dotprod / i8mm ones), so it measures them and keeps the fastest
INT8_GEMM_TYPES = ("u8s8", "s8s8", "u8u8")
_PROBE_N = 256


class OnnxRuntimeInt8Gemm:
    """The int8 roofline probe: onnxruntime's own integer matmul (MatMulInteger, int32 out) of an n x n
    square on ``threads`` threads, the worker's config otherwise (``info["flop"]`` = 2 n^3 integer ops).

    B is a constant initializer (prepacked at load, like a model's weights), A the fed input; ``run``
    ignores its inputs. ``options``: ``n`` (default 2048; an upper limit: shrunk, in multiples of 256,
    until one call is estimated at <= ``max_call_s``, default 1.0 s, as the float probe does), ``types``
    (one of INT8_GEMM_TYPES; default: the fastest of them at n=256, timed here), ``providers``. Operand
    values stay within |a| <= 127, |b| <= 64, so even AVX2's saturating 16-bit pair sums are exact and the
    product equals numpy's int32 matmul of ``self.a`` and ``self.b``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        import onnxruntime as ort

        self.config = config
        self.options: dict[str, Any] = config.get("options", {})
        self.threads = int(config.get("threads") or os.cpu_count() or 1)
        n_max = int(self.options.get("n", 2048))
        providers = self.options.get("providers", [PARITY_PROVIDER])

        def make(n: int, types: str) -> _IntegerMatMul:
            return _IntegerMatMul(ort, n, types, self.threads, providers)

        probe = min(_PROBE_N, n_max)
        candidates = [self.options["types"]] if self.options.get("types") else list(INT8_GEMM_TYPES)
        if not set(candidates) <= set(INT8_GEMM_TYPES):
            raise ValueError(f"unknown MatMulInteger types {candidates[0]!r}; one of {', '.join(INT8_GEMM_TYPES)}")
        best = {types: _best_time(make(probe, types)) for types in candidates}
        types = min(best, key=best.get)
        n = _gemm_size(best[types], probe, n_max, float(self.options.get("max_call_s", 1.0)))
        self.gemm = make(n, types)
        self.a, self.b = self.gemm.a, self.gemm.b
        a, b = types[:2], types[2:]
        self.info: dict[str, Any] = {
            "threads": self.threads, "runtime": "gemm", "precision": "int8", "n": n, "flop": 2 * n ** 3,
            "engine": f"onnxruntime {package_version('onnxruntime')} MatMulInteger {a} x {b} (B constant)",
            "types": types, "candidates_n": probe,
            "candidates_gops": {t: 2 * probe ** 3 / seconds / 1e9 for t, seconds in best.items()},
            "providers": self.gemm.session.get_providers(), "native": native_int8()}

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return self.gemm()

    def compute_precision(self, inputs: list[np.ndarray]) -> str:
        return "int8"

    def profile(self) -> list[dict[str, Any]]:
        return []


class _IntegerMatMul:
    """One MatMulInteger session of n x n operands of ``types`` ("u8s8": A uint8, B int8); calling it runs it."""

    def __init__(self, ort: Any, n: int, types: str, threads: int, providers: list[str]) -> None:
        try:
            import onnx
            from onnx import helper, numpy_helper
        except ImportError as exc:
            raise ImportError("the onnxruntime int8 GEMM probe builds its one-node model with the onnx package, "
                              "which is not installed for this python (pip install onnx)") from exc
        rng = np.random.default_rng(0)
        kinds = {"u8": (np.uint8, 0, 128, 0, 65), "s8": (np.int8, -127, 128, -64, 65)}  # dtype, A range, B range
        (a_type, a_low, a_high, _, _), (b_type, _, _, b_low, b_high) = kinds[types[:2]], kinds[types[2:]]
        self.a = rng.integers(a_low, a_high, (n, n)).astype(a_type)
        self.b = rng.integers(b_low, b_high, (n, n)).astype(b_type)
        tensor_type = {np.uint8: onnx.TensorProto.UINT8, np.int8: onnx.TensorProto.INT8}
        graph = helper.make_graph(
            [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "int8_gemm",
            [helper.make_tensor_value_info("A", tensor_type[a_type], [n, n])],
            [helper.make_tensor_value_info("Y", onnx.TensorProto.INT32, [n, n])],
            initializer=[numpy_helper.from_array(self.b, "B")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8  # what onnxruntime >= 1.10 reads: a remote device may have an older one
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        self.feeds = {"A": self.a}

    def __call__(self) -> list[np.ndarray]:
        return self.session.run(None, self.feeds)


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


SESSIONS = {RUNTIME: OnnxRuntimeSession, INT8_GEMM: OnnxRuntimeInt8Gemm}


# --- what ran: kernels, their kinds and precisions ------------------------------------------------------

def _ort_kernel_events(path: str) -> list[dict[str, Any]]:
    """The per-kernel events of an onnxruntime profile JSON (one per node run; args: op_name, input types)."""
    with open(path) as fh:
        events = json.load(fh)
    return [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]


_MATMUL_OPS = ("MatMul", "Gemm", "Conv", "FusedMatMul", "FusedGemm", "FusedConv", "NchwcConv", "Attention",
               "MultiHeadAttention")
#: kernels that multiply 8-bit integers: what onnxruntime fuses QDQ node units into, and the QOperator ops
INT8_MATMUL_KERNELS = frozenset({"QLinearMatMul", "QLinearConv", "QGemm", "MatMulInteger", "MatMulIntegerToFloat",
                                 "ConvInteger", "DynamicQuantizeMatMul", "QAttention"})
#: kernels that only convert between precisions
CONVERT_KERNELS = frozenset({"QuantizeLinear", "DequantizeLinear", "Cast"})
#: kernels that only multiply matrices (convolutions included; fused attention, which also runs a softmax, not)
GEMM_KERNELS = frozenset(set(_MATMUL_OPS) | INT8_MATMUL_KERNELS | {"MatMulNBits"}) - {
    "Attention", "MultiHeadAttention", "QAttention"}


def op_kind(op: str, nbits_int8: bool = False) -> str:
    """A profiled kernel's kind: "int8" (integer kernels: QLinear*, the ones above, DynamicQuantize*, and
    MatMulNBits when it quantizes its activations), "convert" (Q/DQ, Cast) or "float"."""
    if op in INT8_MATMUL_KERNELS or op.startswith(("QLinear", "DynamicQuantize")) or op == "QEmbedLayerNormalization":
        return "int8"
    if op == "MatMulNBits" and nbits_int8:
        return "int8"
    return "convert" if op in CONVERT_KERNELS else "float"


def one_precision(counts: dict[str, int]) -> str:
    """The one precision of ``counts`` (matmul kernels per precision), "mixed" for several, "unknown" for none."""
    return next(iter(counts)) if len(counts) == 1 else ("mixed" if counts else "unknown")


def _ort_matmul_precisions(path: str, providers: list[str], threads: int, feeds: dict[str, np.ndarray],
                           nbits_int8: bool = False, config: dict[str, str] | None = None) -> dict[str, int]:
    """How many matrix-multiplying kernels ran in each precision, from one profiled inference in a throwaway
    session: integer kernels (QDQ node units fused into QLinearMatMul, QGemm, MatMulIntegerToFloat, ...) are
    int8; MatMulNBits dequantizes its weights inside the kernel and multiplies in its activations' float type
    (int8 only at accuracy_level 4); float kernels by their first input's type (onnxruntime's CPU provider has
    no fp16 GEMM on most CPUs and wraps fp16 nodes in inserted Casts to float)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "precision")
        for key, value in (config or {}).items():
            opts.add_session_config_entry(key, value)
        session = ort.InferenceSession(path, opts, providers=providers)
        session.run(None, feeds)
        events = _ort_kernel_events(session.end_profiling())
    named = {"float": "fp32", "float16": "fp16", "bfloat16": "bf16"}
    counts: dict[str, int] = {}
    for e in events:
        args = e.get("args", {})
        op, types = args.get("op_name"), args.get("input_type_shape") or [{}]
        if op in INT8_MATMUL_KERNELS or (op == "MatMulNBits" and nbits_int8):
            found = "int8"
        elif op in _MATMUL_OPS or op == "MatMulNBits":
            first = next(iter(types[0]), "unknown")
            found = named.get(first, first)
        else:
            continue
        counts[found] = counts.get(found, 0) + 1
    return counts


def _ort_matmul_precision(path: str, providers: list[str], threads: int, feeds: dict[str, np.ndarray],
                          nbits_int8: bool = False) -> str:
    """The one precision the matrix multiplies ran in (:func:`_ort_matmul_precisions`), "mixed" or "unknown"."""
    return one_precision(_ort_matmul_precisions(path, providers, threads, feeds, nbits_int8))


def session_config(precision: str) -> dict[str, str]:
    """Session config entries an artifact of stored ``precision`` (:func:`stored_precision`) is loaded with:
    :data:`FOLD_WEIGHTS_CONFIG` for weight-only artifacts with DequantizeLinear weights, else none."""
    weight_only = precision.startswith("w") and "DequantizeLinear" in precision
    return dict(FOLD_WEIGHTS_CONFIG) if weight_only else {}


# --- what the artifact stores --------------------------------------------------------------------------

_QOPERATOR_OPS = ("MatMulInteger", "ConvInteger", "QGemm", "QAttention")


def _onnx_precision(path: str) -> tuple[str, bool]:
    """The artifact's stored precision (:func:`stored_precision`) and whether all its MatMulNBits quantize
    their activations to int8 (``accuracy_level`` 4; 0, the default, and 1 compute in fp32 on the CPU)."""
    try:
        import onnx

        model = onnx.load(path, load_external_data=False)
        nbits = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                 for n in model.graph.node if n.op_type == "MatMulNBits"]
        return stored_precision(model), bool(nbits) and all(a.get("accuracy_level", 0) == 4 for a in nbits)
    except Exception:  # precision is informative; a reading failure must not stop the measurement
        return "unknown", False


def stored_precision(model: Any) -> str:
    """What an onnx ``model`` stores: "int8 (QDQ)" (activations quantized by QuantizeLinear), "int8 (QOperator)",
    "int8 (dynamic)", weight-only "w8 (MatMulNBits, DequantizeLinear)" / "w4 (MatMulNBits)" (bits and the
    ops that hold them), else "fp16" when it has float16 initializers, else "fp32"."""
    import onnx

    graph = model.graph
    ops = {n.op_type for n in graph.node}
    if "QuantizeLinear" in ops:
        return "int8 (QDQ)"
    if any(op.startswith("QLinear") or op in _QOPERATOR_OPS for op in ops):
        return "int8 (QOperator)"
    if any(op.startswith("DynamicQuantize") for op in ops):
        return "int8 (dynamic)"
    low_bits = {onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT4: 4,
                onnx.TensorProto.UINT4: 4}
    stored = {t.name: low_bits.get(t.data_type) for t in graph.initializer}
    bits, holders = set(), []
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            bits.add(next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "bits"), 4))
            holders.append("MatMulNBits")
        elif node.op_type == "DequantizeLinear" and stored.get(node.input[0]):
            bits.add(stored[node.input[0]])
            holders.append("DequantizeLinear")
    if bits:
        return "/".join(f"w{b}" for b in sorted(bits, reverse=True)) + f" ({', '.join(sorted(set(holders)))})"
    return "fp16" if any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer) else "fp32"
