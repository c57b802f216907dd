"""TFLite/LiteRT quantization with Google's ai-edge-quantizer (AEQ), from the fp32 .tflite litert-torch wrote.

What the quantizer does per precision (recipes are AEQ's own op configs; edgevit only picks the ops):

- ``int8`` (static W8A8, AEQ's ``static_wi8_ai8`` op config): weights int8 per-channel symmetric, activations
  int8 per-tensor (asymmetric, as LiteRT's int8 kernels take them) from calibration. Ranges come from AEQ's
  calibrator run on the LiteRT interpreter, merged over samples with AEQ's ``qsv_utils.min_max_update``
  (global min/max): ``method="minmax"`` is the only method; AEQ has no percentile or entropy calibration.

  * scheme ``safe``: only FULLY_CONNECTED, CONV_2D, DEPTHWISE_CONV_2D and TRANSPOSE_CONV (the weight
    matmuls) run in int8; AEQ inserts QUANTIZE/DEQUANTIZE around them, so the LayerNorm pieces, SOFTMAX, GELU,
    the residual ADDs and attention's activation x activation BATCH_MATMULs compute in float. BATCH_MATMUL
    stays float because XNNPACK has no int8 kernel for two activations: each int8 one is run by LiteRT's own
    kernel between two XNNPACK partitions. DeiT-Tiny measured (interleaved, 12 rounds): its 24 attention
    matmuls in int8 left the graph in 25 pieces at 33.0 ms; in float it is one piece at 6.3 ms (5.2x), 2.2x
    faster than fp32, at the same SQNR (27.5 vs 28.1 dB on seeded inputs). For XNNPACK (the default
    accelerator) the ops between the matmuls that XNNPACK runs in int8 (logistic, multiply, data movement)
    join them when a measured comparison shows it keeps the accuracy: :mod:`.int8_region`;
  * scheme ``full``: every op AEQ's static int8 policy supports (ADD, MUL, MEAN, SOFTMAX, GELU, ...).

- ``w8`` (AEQ's ``weight_only_wi8_afp32``): int8 per-channel symmetric weights of FULLY_CONNECTED, CONV_2D,
  DEPTHWISE_CONV_2D, TRANSPOSE_CONV, BATCH_MATMUL and EMBEDDING_LOOKUP, each behind an explicit DEQUANTIZE;
  the ops compute in float. Data-free.
- ``w4`` (AEQ's ``weight_only_wi4_afp32``): the same with int4 per-channel symmetric weights, for
  FULLY_CONNECTED, CONV_2D, BATCH_MATMUL and EMBEDDING_LOOKUP (AEQ's policy has no int4 depthwise conv, and
  no block-wise scales for weight-only int4: block-wise int4 exists only as dynamic-range FULLY_CONNECTED).

In every case the model's inputs and outputs stay float32 (for int8, AEQ quantizes the input with a QUANTIZE
op and dequantizes the output), so the LiteRT session that runs the fp32 artifact runs this one.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from edgevit.errors import EdgevitError
from edgevit.export.backends.tflite.int8_region import Region, int8_region, record, region_recipe, widen
from edgevit.export.backends.tflite.qdq_passes import rewrite_artifact
from edgevit.export.quantization import QuantSpec

#: the packages whose versions decide a quantized artifact's bytes (the bench's export cache key)
PACKAGES = ("ai-edge-quantizer", "ai-edge-litert")

PRECISIONS: dict[str, str] = {
    "int8": "ai-edge-quantizer static W8A8 (static_wi8_ai8): int8 per-channel weights, int8 per-tensor "
            "activations from min/max calibration; safe: FC/conv/batch-matmul only, full: every op it supports",
    "w8": "ai-edge-quantizer weight_only_wi8_afp32: int8 per-channel weights of FC/conv/depthwise/batch-matmul, "
          "dequantized to float; activations float",
    "w4": "ai-edge-quantizer weight_only_wi4_afp32: int4 per-channel weights of FC/conv/batch-matmul, "
          "dequantized to float; activations float",
}

#: the matrix-multiplying ops the transformer-safe int8 scheme quantizes (AEQ operation names)
SAFE_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D_TRANSPOSE")  # not BATCH_MATMUL: above
#: the calibration methods AEQ has (activation ranges from min/max statistics only)
METHODS = ("minmax",)

# Ops that move, reshape or convert data rather than compute on it: neither quantized nor float compute.
_NOT_COMPUTE = frozenset("""
RESHAPE TRANSPOSE SLICE STRIDED_SLICE CONCATENATION SPLIT SPLIT_V PACK UNPACK SQUEEZE EXPAND_DIMS GATHER
GATHER_ND BROADCAST_TO PAD PADV2 MIRROR_PAD TILE DEPTH_TO_SPACE SPACE_TO_DEPTH QUANTIZE DEQUANTIZE CAST SHAPE
FILL ZEROS_LIKE ONES_LIKE REVERSE_V2 RESIZE_NEAREST_NEIGHBOR
""".split())
_QUANTIZED_DTYPES = frozenset({"INT8", "UINT8", "INT16", "INT4", "INT2"})


def quantize(fp32_artifact: Path, out: Path, spec: QuantSpec,
             calibration: Sequence[Sequence[np.ndarray]]) -> dict[str, Any]:
    """Write the ``spec.precision`` artifact of ``fp32_artifact`` to ``out`` with ai-edge-quantizer."""
    from ai_edge_quantizer import quantizer

    spec = spec.with_method(METHODS)  # "auto": this tool's default
    if spec.precision not in PRECISIONS:
        raise EdgevitError(f"tflite cannot quantize to '{spec.precision}'; choose one of: {', '.join(PRECISIONS)}")
    fp32_artifact, out = Path(fp32_artifact), Path(out)
    recipe = _recipe(spec)
    region = _widening(fp32_artifact, spec, calibration)
    wide = recipe + region_recipe(recipe[0], region) if region else None
    qsvs, widening = None, None
    if wide:  # the widened recipe's ranges cover the matmul-only recipe's tensors too: one calibration
        try:
            qsvs = calibrate(fp32_artifact, wide, spec, calibration)
        except Exception as exc:  # the widening must never cost the model its int8 artifact
            widening = record(region, f"calibration: {type(exc).__name__}: {exc}", None, None, 0)
    if spec.calibrated and qsvs is None:
        qsvs = calibrate(fp32_artifact, recipe, spec, calibration)
    quantizer.Quantizer(str(fp32_artifact), recipe).quantize(qsvs).export_model(str(out), overwrite=True)
    if wide and widening is None:
        widening = widen(fp32_artifact, out, wide, qsvs, region, calibration)
    # the accelerator's passes on the quantized model (export/backends/tflite/qdq_passes.py)
    rewritten = rewrite_artifact(out, getattr(spec, "accelerator", None), spec.precision, calibration, fp32_artifact)
    quantized_ops, float_ops, conversions = count_ops(out)
    return {
        "tool": _tool(spec),
        "versions": {name: version(name) for name in ("ai-edge-quantizer", "ai-edge-litert")},
        "weights": _weights(spec),
        "activations": _activations(spec, len(calibration)),
        "quantized_ops": quantized_ops,
        "float_ops": float_ops,
        "notes": _notes(spec, conversions, fp32_artifact, out) + ([widening["note"]] if widening else [])
        + rewritten["notes"],
        # the quantized-graph passes of the accelerator (only when it has some: the keys stay INFO_KEYS otherwise)
        **({"passes": rewritten["passes"]} if rewritten["passes"] else {}),
        **({"int8_region": widening} if widening else {}),
    }


def _widening(fp32_artifact: Path, spec: QuantSpec, calibration: Sequence[Sequence[np.ndarray]]) -> Region | None:
    """The ops `safe` int8 may also quantize on XNNPACK (export/backends/tflite/int8_region.py), or None."""
    if (spec.precision, spec.scheme, getattr(spec, "accelerator", None)) != ("int8", "safe", "xnnpack"):
        return None
    if not calibration:
        return None
    region = int8_region(fp32_artifact, SAFE_OPS)
    return region if region.scopes else None


def _recipe(spec: QuantSpec) -> list[dict[str, Any]]:
    """AEQ's own recipe for the precision; for int8 its static op config on the scheme's ops."""
    from ai_edge_quantizer import recipe

    if spec.precision == "w8":
        return recipe.weight_only_wi8_afp32()
    if spec.precision == "w4":
        return recipe.weight_only_wi4_afp32()
    if spec.method not in METHODS:
        raise EdgevitError(f"ai-edge-quantizer calibrates int8 activation ranges by min/max only: "
                           f"--calibration-method {spec.method} is not available for tflite; use minmax")
    static = recipe.static_wi8_ai8()  # [one rule: regex ".*", every supported op, the static int8 op config]
    if spec.scheme == "safe":
        return [dict(static[0], operation=op) for op in SAFE_OPS]
    # "full" also quantizes the graph's INPUT/OUTPUT pseudo-ops, i.e. makes the model's interface int8;
    # excluding them makes AEQ quantize after the input and dequantize before the output instead.
    return static + [{"regex": ".*", "operation": op, "algorithm_key": "no_quantize"} for op in ("INPUT", "OUTPUT")]


def calibrate(fp32_artifact: Path, recipe: list[dict[str, Any]], spec: QuantSpec,
               calibration: Sequence[Sequence[np.ndarray]]) -> dict[str, Any]:
    """Activation ranges of the fp32 model on the calibration samples: AEQ's calibrator, global min/max.

    ``Quantizer.calibrate`` merges per-sample ranges with a 0.95 moving average, which tracks a typical
    sample's extremes rather than the extremes: larger activations (often the top logit) get clipped. AEQ's
    Calibrator takes its ``qsv_utils.min_max_update`` instead, the plain min/max over all samples.
    """
    from ai_edge_quantizer import calibrator, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

    if not calibration:
        raise EdgevitError("tflite int8 needs calibration samples (static activation ranges); none were given")
    signature, names = _signature_inputs(fp32_artifact)
    if any(len(sample) != len(names) for sample in calibration):
        raise EdgevitError(f"each calibration sample must hold the model's {len(names)} input(s)")
    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(recipe)
    calib = calibrator.Calibrator(str(fp32_artifact), num_threads=os.cpu_count() or 1,
                                  qsv_update_func=qsv_utils.min_max_update)
    samples = [{name: np.asarray(x, dtype=np.float32) for name, x in zip(names, sample)} for sample in calibration]
    calib.calibrate({signature: samples}, manager)
    return calib.get_model_qsvs()


def _signature_inputs(path: Path) -> tuple[str, list[str]]:
    """The model's signature key and its input names in the interpreter's input order (the order edgevit's
    session feeds, and the order of each calibration sample). The signature lists its inputs by name, in
    an order of its own, so they are matched to the interpreter's inputs by tensor index."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    signatures = interpreter.get_signature_list()
    if len(signatures) != 1:
        raise EdgevitError(f"tflite quantization expects one signature, {path.name} has {len(signatures)}")
    key = next(iter(signatures))
    by_index = {d["index"]: name for name, d in interpreter.get_signature_runner(key).get_input_details().items()}
    return key, [by_index[d["index"]] for d in interpreter.get_input_details()]


def count_ops(path: Path) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(quantized compute ops, float compute ops, QUANTIZE/DEQUANTIZE ops) of the written .tflite, by type.

    A compute op is quantized when it reads an integer-quantized tensor (int8 activations or weights), or a
    weight that a DEQUANTIZE makes from an integer constant (weight-only).
    """
    from edgevit.export.backends.tflite.coverage import _read_tflite

    g = _read_tflite(Path(path))
    dequantized_weights = {op.outputs[0] for op in g.ops if op.name == "DEQUANTIZE" and op.outputs
                           and _is_quantized_constant(g.t(op.inputs[0]))}
    quantized, floating, conversions = Counter(), Counter(), Counter()
    for op in g.ops:
        if op.name in ("QUANTIZE", "DEQUANTIZE"):
            conversions[op.name] += 1
        elif op.name in _NOT_COMPUTE:
            continue
        elif any(i in dequantized_weights or _is_quantized(g.t(i)) for i in op.inputs):
            quantized[op.name] += 1
        else:
            floating[op.name] += 1
    return dict(sorted(quantized.items())), dict(sorted(floating.items())), dict(sorted(conversions.items()))


def _is_quantized(tensor: Any) -> bool:
    return tensor is not None and tensor.dtype in _QUANTIZED_DTYPES


def _is_quantized_constant(tensor: Any) -> bool:
    return _is_quantized(tensor) and not tensor.runtime


def _tool(spec: QuantSpec) -> str:
    if spec.precision == "w8":
        return "ai_edge_quantizer.Quantizer.quantize (recipe.weight_only_wi8_afp32)"
    if spec.precision == "w4":
        return "ai_edge_quantizer.Quantizer.quantize (recipe.weight_only_wi4_afp32)"
    ops = ", ".join(SAFE_OPS) if spec.scheme == "safe" else "every supported op, model INPUT/OUTPUT kept float"
    return (f"ai_edge_quantizer.calibrator.Calibrator(qsv_update_func=qsv_utils.min_max_update).calibrate + "
            f"ai_edge_quantizer.Quantizer.quantize (recipe.static_wi8_ai8 op config on {ops})")


def _weights(spec: QuantSpec) -> str:
    if spec.precision == "int8":
        return "int8 per-channel symmetric (min/max)"
    bits = 8 if spec.precision == "w8" else 4
    return f"int{bits} per-channel symmetric (min/max), dequantized to float32 by DEQUANTIZE ops"


def _activations(spec: QuantSpec, samples: int) -> str:
    if spec.precision != "int8":
        return "float"
    return f"int8 per-tensor asymmetric, min/max over {samples} calibration samples"


def _notes(spec: QuantSpec, conversions: dict[str, int], fp32_artifact: Path, out: Path) -> list[str]:
    ratio = out.stat().st_size / fp32_artifact.stat().st_size
    notes = [f"artifact size {ratio:.2f}x of fp32 (flatbuffer tensor names and per-channel scales included)"]
    if spec.precision == "int8":
        notes.append(f"AEQ inserted {conversions.get('QUANTIZE', 0)} QUANTIZE and "
                     f"{conversions.get('DEQUANTIZE', 0)} DEQUANTIZE ops between float and int8 ops; "
                     "model inputs/outputs stay float32")
        notes.append("ai-edge-quantizer has min/max activation calibration only (no percentile/entropy)")
    else:
        notes.append("weight-only: the ops compute in float32 on weights that DEQUANTIZE ops expand "
                     "(the file shrinks; the arithmetic stays float)")
    if spec.precision == "w4":
        notes.append("int4 scales are per output channel: AEQ's weight-only int4 has no block-wise scales, "
                     "and no int4 DEPTHWISE_CONV_2D")
    return notes
