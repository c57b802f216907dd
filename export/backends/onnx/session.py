"""onnxruntime: the one session that runs .onnx artifacts, for parity (``edgevit export``) and the bench worker.

Self-contained on purpose (standard library + numpy + onnxruntime; onnx only to read an artifact's
precision; no edgevit import): ``devices/worker_bundle.py`` bundles this file into the worker that is
pushed to remote machines. What the worker reads here, by name:

- ``RUNTIME``: the worker's runtime key, also the key of :func:`probe_facts` in a machine's facts;
- ``SESSIONS``: runtime key -> session class (``cls(config)``: see ``devices/worker.py`` for the config);
- ``PACKAGES``: ``(module, package, import it)`` probed on every machine (``facts["packages"]``);
- ``probe_facts()``: this runtime's facts (its execution providers); ``describe(facts)``: the machine line.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    import numpy as np
except ImportError:  # the worker's probe still answers without numpy
    np = None  # type: ignore[assignment]

RUNTIME = "onnxruntime"
PACKAGES = (("onnxruntime", "onnxruntime", True),)
PARITY_PROVIDER = "CPUExecutionProvider"


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


def top_ops(totals: dict[str, float], counts: dict[str, int], runs: int, limit: int = 15) -> list[dict[str, Any]]:
    """Aggregate per op type: ms per inference and share of the profiled time, largest first."""
    whole = sum(totals.values()) or 1.0
    rows = [{"op": op, "ms_per_run": ms / max(runs, 1), "share": ms / whole, "calls_per_run": counts[op] / max(runs, 1)}
            for op, ms in totals.items()]
    return sorted(rows, key=lambda r: -r["ms_per_run"])[:limit]


class OnnxRuntimeSession:
    """One loaded .onnx: ``run(inputs)`` (the outputs in order), ``info``, ``profile()``, ``compute_precision()``.

    ``config``: ``artifact``, ``threads``, ``options`` (``providers``, default the CPU provider),
    ``profile``; ``parity`` (see :meth:`for_parity`) gives ``info`` as export manifests record it.
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
        self.session = ort.InferenceSession(config["artifact"], opts, providers=providers)
        self.names = [i.name for i in self.session.get_inputs()]
        self.runs = 0
        self.info: dict[str, Any] = {"threads": self.threads, "runtime": RUNTIME,
                                     "version": package_version("onnxruntime")}
        if parity:
            self.info["provider"] = self.session.get_providers()[0]
        else:
            self.info |= {"providers": self.session.get_providers(), "precision": _onnx_precision(config["artifact"])}

    @classmethod
    def for_parity(cls, path: str, threads: int | None = None) -> "OnnxRuntimeSession":
        """The session ``edgevit export`` checks outputs with: the CPU execution provider only."""
        return cls({"artifact": path, "threads": threads, "parity": True, "options": {"providers": [PARITY_PROVIDER]}})

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        self.runs += 1
        return list(self.session.run(None, dict(zip(self.names, inputs))))

    def compute_precision(self, inputs: list[np.ndarray]) -> str:
        """What the matrix multiplies ran in (the roofline's bound is that precision's GEMM)."""
        if self.info["precision"] != "fp16":
            return self.info["precision"]
        return _ort_matmul_precision(self.config["artifact"], self.session.get_providers(), self.threads,
                                     dict(zip(self.names, inputs)))

    def profile(self) -> list[dict[str, Any]]:
        """Per-op times of the runs since loading (profiling enabled at load), top first."""
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
        return top_ops(totals, counts, self.runs)


SESSIONS = {RUNTIME: OnnxRuntimeSession}


def _ort_kernel_events(path: str) -> list[dict[str, Any]]:
    """The per-kernel events of an onnxruntime profile JSON (one per node run; args: op_name, input types)."""
    with open(path) as fh:
        events = json.load(fh)
    return [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]


_MATMUL_OPS = ("MatMul", "Gemm", "Conv", "FusedMatMul", "FusedGemm", "FusedConv", "NchwcConv", "Attention",
               "MultiHeadAttention")


def _ort_matmul_precision(path: str, providers: list[str], threads: int, feeds: dict[str, np.ndarray]) -> str:
    """What an fp16 graph's matrix multiplies run in: onnxruntime's CPU provider has no fp16 GEMM on most
    CPUs and wraps such nodes in inserted Casts to float. One profiled inference in a throwaway session
    reads the element type of each matmul-like kernel's first input."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "precision")
        session = ort.InferenceSession(path, opts, providers=providers)
        session.run(None, feeds)
        events = _ort_kernel_events(session.end_profiling())
    kinds = set()
    for e in events:
        args = e.get("args", {})
        if args.get("op_name") in _MATMUL_OPS and args.get("input_type_shape"):
            kinds.add(next(iter(args["input_type_shape"][0])))
    named = {"float": "fp32", "float16": "fp16", "bfloat16": "bf16"}
    found = {named.get(k, k) for k in kinds}
    return found.pop() if len(found) == 1 else ("mixed" if found else "unknown")


def _onnx_precision(path: str) -> str:
    """fp16 if the graph carries float16 initializers, else fp32 (what onnxruntime computes in)."""
    try:
        import onnx

        model = onnx.load(path, load_external_data=False)
        fp16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
        return "fp16" if fp16 else "fp32"
    except Exception:  # precision is informative; a reading failure must not stop the measurement
        return "unknown"
