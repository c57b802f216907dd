"""LiteRT: the one session that runs .tflite artifacts, for parity (``edgevit export``) and the bench worker.

Self-contained on purpose (standard library + numpy + LiteRT's interpreter: ai-edge-litert, else the
older tflite-runtime wheel; no edgevit import): ``devices/worker_bundle.py`` bundles this file into the
worker that is pushed to remote machines. What the worker reads here by name (see
``export/backends/onnx/session.py``): ``RUNTIME``, ``SESSIONS``, ``PACKAGES``, ``probe_facts()``, ``describe()``.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    import numpy as np
except ImportError:  # the worker's probe still answers without numpy
    np = None  # type: ignore[assignment]

RUNTIME = "litert"
PACKAGES = (("ai_edge_litert", "ai-edge-litert", True), ("tflite_runtime", "tflite-runtime", True))
#: the environment variable naming a GPU delegate library built for the machine (the wheels ship none)
GPU_DELEGATE_ENV = "EDGEVIT_TFLITE_GPU_DELEGATE"


def probe_facts() -> dict[str, Any]:
    gpu = os.environ.get(GPU_DELEGATE_ENV, "")
    return {"gpu_delegate": gpu, "gpu_delegate_exists": bool(gpu) and os.path.exists(gpu)}


def describe(facts: dict[str, Any]) -> str | None:
    gpu_delegate = facts.get(RUNTIME, {}).get("gpu_delegate")
    return f"LiteRT GPU delegate: {gpu_delegate}" if gpu_delegate else None


def package_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _litert_module() -> tuple[Any, str]:
    """LiteRT's interpreter module and its package: ai-edge-litert, else the older tflite-runtime wheel."""
    try:
        from ai_edge_litert import interpreter

        return interpreter, "ai-edge-litert"
    except ImportError:
        from tflite_runtime import interpreter  # type: ignore[no-redef]

        return interpreter, "tflite-runtime"


class LiteRTSession:
    """One loaded .tflite: ``run(inputs)`` (the outputs in order), ``info``, ``profile()``, ``compute_precision()``.

    ``config``: ``artifact``, ``threads``, ``options`` (``delegate``: xnnpack (default), none, or gpu/nnapi
    with ``delegate_library``); ``parity`` (see :meth:`for_parity`) gives ``info`` as export manifests record it.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.options: dict[str, Any] = config.get("options", {})
        self.threads = int(config.get("threads") or os.cpu_count() or 1)
        litert, package = _litert_module()
        delegate = self.options.get("delegate", "xnnpack")
        kwargs: dict[str, Any] = {"model_path": config["artifact"], "num_threads": self.threads}
        if delegate == "none":
            kwargs["experimental_op_resolver_type"] = litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        elif delegate != "xnnpack":  # the default delegate of the interpreter is XNNPACK
            kwargs["experimental_delegates"] = [litert.load_delegate(self.options["delegate_library"])]
        self.interpreter = litert.Interpreter(**kwargs)
        self.interpreter.allocate_tensors()
        self.inputs = self.interpreter.get_input_details()
        self.outputs = self.interpreter.get_output_details()
        self.info: dict[str, Any] = {"threads": self.threads}
        if config.get("parity"):
            self.info |= {"runtime": package, "version": package_version(package), "delegate": delegate.upper()}
            return
        dtypes = {str(d["dtype"].__name__) for d in self.interpreter.get_tensor_details()
                  if d["dtype"] in (np.float16, np.float32)}
        self.info |= {"runtime": RUNTIME, "package": package, "version": package_version(package), "delegate": delegate,
                      "precision": "fp16 weights" if "float16" in dtypes else "fp32"}
        if delegate == "xnnpack":
            self.info |= delegate_placement(self.interpreter)

    @classmethod
    def for_parity(cls, path: str, threads: int | None = None) -> "LiteRTSession":
        """The session ``edgevit export`` checks outputs with: the interpreter's default XNNPACK delegate."""
        return cls({"artifact": path, "threads": threads, "parity": True, "options": {}})

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        for detail, array in zip(self.inputs, inputs):
            # LiteRT narrows int64 graph inputs to int32; feed what the interpreter declares.
            self.interpreter.set_tensor(detail["index"], np.asarray(array, dtype=detail["dtype"]))
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(d["index"]) for d in self.outputs]  # get_tensor copies

    def compute_precision(self, inputs: list[np.ndarray]) -> str:
        """What the matrix multiplies ran in, from the operand types of each FULLY_CONNECTED / CONV_2D /
        DEPTHWISE_CONV_2D / TRANSPOSE_CONV / BATCH_MATMUL (:func:`matmul_precisions`, counts in
        ``info["matmul_precisions"]``); ``info["precision"]`` becomes what the artifact stores
        (:func:`stored_precision`). A GPU/NNAPI delegate chooses for itself and does not say: "unknown"."""
        ops = self.interpreter._get_ops_details()  # op names and tensor indices; no public API has them
        tensors = {d["index"]: d for d in self.interpreter.get_tensor_details()}
        self.info["precision"] = stored_precision(self.interpreter, ops, tensors, self.info["precision"])
        if self.info["delegate"] not in ("xnnpack", "none"):
            return "unknown"
        counts = matmul_precisions(ops, tensors)
        self.info["matmul_precisions"] = counts
        return next(iter(counts)) if len(counts) == 1 else ("mixed" if counts else "unknown")

    def profile(self) -> list[dict[str, Any]]:
        # The interpreter's Python API has no per-op profiler (LiteRT's op profiling lives in its C++
        # benchmark tool), so there are no per-op rows or kinds to report.
        return []


def delegate_placement(interpreter: Any) -> dict[str, Any]:
    """How the delegate split the graph: ``delegate_partitions`` (its kernels in the execution plan) and
    ``outside_delegate`` ({op name: count} of the ops LiteRT's own kernels run between them).

    The Python API has no execution plan, but the interpreter keeps every original node and appends one
    DELEGATE node per partition, with the partition's boundary tensors as inputs/outputs. An op whose output
    leaves a partition is delegated; one whose output enters a partition (or is a graph output no partition
    produces) is not; an op whose output stays between ops takes the side of its reader (a tensor inside a
    partition joins two delegated ops, one outside joins two undelegated ones).
    """
    ip = interpreter._interpreter  # no public API lists nodes
    names = [ip.NodeName(i) for i in range(ip.NumNodes())]
    partitions = [i for i, name in enumerate(names) if name == "DELEGATE"]
    ops = [i for i, name in enumerate(names) if name != "DELEGATE"]  # the model's ops, in execution order
    leaving = {int(t) for d in partitions for t in ip.NodeOutputs(d)}
    entering = {int(t) for d in partitions for t in ip.NodeInputs(d)}
    entering |= {d["index"] for d in interpreter.get_output_details()} - leaving
    readers: dict[int, list[int]] = {}
    for i in ops:
        for t in ip.NodeInputs(i):
            readers.setdefault(int(t), []).append(i)
    delegated: dict[int, bool] = {}
    for i in reversed(ops):  # readers come later in execution order: each is decided before its producer
        outs = [int(t) for t in ip.NodeOutputs(i)]
        if any(t in leaving for t in outs):
            delegated[i] = True
        elif any(t in entering for t in outs):
            delegated[i] = False
        else:  # its outputs stay between ops: on the side of a reader
            sides = [delegated[r] for t in outs for r in readers.get(t, []) if r in delegated]
            if sides:
                delegated[i] = sides[0]
    outside: dict[str, int] = {}
    for i in ops:
        if delegated.get(i) is False:
            outside[names[i]] = outside.get(names[i], 0) + 1
    return {"delegate_partitions": len(partitions), "outside_delegate": dict(sorted(outside.items()))}


#: LiteRT ops that multiply matrices
MATMUL_OPS = frozenset({"FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "BATCH_MATMUL",
                        "CONV_3D"})
_INTEGER = {"int8": "int8", "uint8": "int8", "int16": "int16"}


def matmul_precisions(ops: list[dict[str, Any]], tensors: dict[int, dict[str, Any]]) -> dict[str, int]:
    """How many matrix-multiplying ops run in each precision, from their operand types:

    - int8 (uint8) activations: the static W8A8 kernels (XNNPACK qs8/qu8 GEMMs) -> int8 (int16: 16x8 -> int16);
    - float activations with int8 weights fed directly (dynamic-range "hybrid" ops): the kernels quantize the
      activations on each call and multiply in int8 (XNNPACK qd8 GEMMs, the builtin hybrid kernels; on a
      tiny ViT both land ~1e-2 relative from the fp32 output, the size of activation quantization) -> int8;
    - float activations with weights behind a DEQUANTIZE (weight-only int8/int4, fp16 weights): float. XNNPACK
      computes these in fp32: on a weight-only int8 and int4 tiny ViT its output equals that of LiteRT's
      builtin kernels (an explicit DEQUANTIZE, then a float kernel) to 2e-7 relative, where any activation
      quantization would show as ~1e-2 (as the W8A8 artifact does) -> fp32.
    """
    counts: dict[str, int] = {}
    for op in ops:
        if op["op_name"] not in MATMUL_OPS or len(op["inputs"]) < 2:
            continue
        activation, weight = (tensors[i]["dtype"].__name__ for i in op["inputs"][:2])
        found = _INTEGER.get(activation) or ("int8" if weight == "int8" else
                                            {"float32": "fp32", "float16": "fp16"}.get(activation, activation))
        counts[found] = counts.get(found, 0) + 1
    return counts


def stored_precision(interpreter: Any, ops: list[dict[str, Any]], tensors: dict[int, dict[str, Any]],
                     default: str) -> str:
    """What the artifact stores: "int8 (W8A8)" (integer activations on a matrix multiply), "int8 (dynamic
    range)" (int8 weights fed to a float-activation matmul), "w8 (int8 weights)" / "w4 (int4 weights)"
    (integer constants behind DEQUANTIZE ops), else ``default`` (fp32, "fp16 weights"). The interpreter
    shows int4 tensors unpacked as int8: int4 is told by the values, all within [-8, 7] (per-channel int8
    weights reach +-127 in every channel)."""
    matmuls = [op for op in ops if op["op_name"] in MATMUL_OPS and len(op["inputs"]) >= 2]
    if any(tensors[op["inputs"][0]]["dtype"].__name__ in _INTEGER for op in matmuls):
        return "int8 (W8A8)"
    if any(tensors[op["inputs"][1]]["dtype"].__name__ == "int8" for op in matmuls):
        return "int8 (dynamic range)"
    produced = {i for op in ops for i in op["outputs"]}
    weights = [op["inputs"][0] for op in ops if op["op_name"] == "DEQUANTIZE" and op["inputs"][0] not in produced
               and tensors[op["inputs"][0]]["dtype"].__name__ == "int8"]
    if not weights:
        return default
    bits = sorted({4 if np.abs(interpreter.get_tensor(i).astype(np.int16)).max() <= 8 else 8 for i in weights},
                  reverse=True)
    return "/".join(f"w{b}" for b in bits) + f" ({' and '.join(f'int{b}' for b in bits)} weights)"


SESSIONS = {RUNTIME: LiteRTSession}
