"""OpenVINO quantization: NNCF on the fp32 IR, written back as IR (.xml + .bin) with float32 inputs/outputs.

What NNCF does per precision:

- ``int8`` (``nncf.quantize``, post-training, calibrated): inserts FakeQuantize nodes (256 levels) on
  the activations that feed quantizable ops and quantizes their weights per output channel, symmetric
  (``ov.save_model`` stores those weights as i8 constants + a dequantizing Multiply). The CPU plugin
  runs FakeQuantize-wrapped ops as int8 kernels (low-precision transformations).

  * scheme ``safe``: ``model_type=ModelType.TRANSFORMER`` (preset MIXED: activations asymmetric
    per-tensor, except activation x activation MatMuls which NNCF makes symmetric). That model type makes
    NNCF ignore Add, Multiply, MVN (LayerNorm), ReduceMean, Divide, Power, ... so residual adds and
    LayerNorm stay float; Softmax and Gelu are never quantized by NNCF; its transformer patterns also keep
    the Softmax output float, so attention's A.V MatMul stays float while Q.K^T is int8. SmoothQuant,
    which that model type switches on, is switched off (see :data:`NO_SMOOTH_QUANT`); NNCF's fast bias
    correction stays on.
  * scheme ``full``: no model type, preset PERFORMANCE (symmetric everything, what integer-only NPUs
    want): every op in NNCF's CPU hardware config gets int8 inputs (Convolution, MatMul incl. A.V, Add,
    Multiply, MVN, ReduceMean, ...); Softmax and Gelu have no int8 form in NNCF and stay float.
  * calibration methods (``AdvancedQuantizationParameters.activations_range_estimator_params``):
    ``percentile`` -> ``RangeEstimatorParametersSet.MEAN_QUANTILE`` (per-sample 0.01% / 99.99%
    quantiles, averaged), ``minmax`` -> ``MINMAX`` (global min/max). ``entropy`` has no NNCF
    equivalent (its HISTOGRAM estimator minimises L2 error, not KL divergence): a one-line error.

- ``w8`` (``nncf.compress_weights``, INT8_SYM, data-free): int8 per-output-channel weights of every
  MatMul and Convolution (fp16 scales), dequantized at run time; activations float.
- ``w4`` (``nncf.compress_weights``, INT4_SYM, group_size=32, ratio=1.0, all_layers=True): 4-bit
  weights with one fp16 scale per block of 32 input channels for every MatMul (the first/last layer
  included, thanks to all_layers); NNCF keeps Convolution weights in its backup mode (INT8_ASYM,
  per-channel), and any MatMul whose input channels do not split into blocks of 32.

The counts of quantized / float ops are read back from the written IR (:func:`count_ops`, :class:`IRGraph`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgevit.errors import EdgevitError
from edgevit.export.quantization import QuantSpec

if TYPE_CHECKING:
    import openvino as ov

METHODS = ("minmax", "percentile")  # NNCF range estimators (no KL-divergence one); minmax first: NNCF's
# MEAN_QUANTILE averages per-sample quantiles and clipped a trained MobileViT-v2 to 9.5 dB / -2.0 points where
# minmax gave 36.4 dB / 0.0 (benchmarks/RESULTS.md, 2026-12-04)

#: the packages whose versions decide a quantized artifact's bytes (the bench's export cache key)
PACKAGES = ("nncf", "openvino")

PRECISIONS: dict[str, str] = {
    "int8": "nncf.quantize: static W8A8 FakeQuantize IR from calibration data (safe: ModelType.TRANSFORMER; "
            "full: every op NNCF's CPU config can quantize)",
    "w8": "nncf.compress_weights INT8_SYM: per-channel int8 MatMul and Convolution weights, float activations",
    "w4": "nncf.compress_weights INT4_SYM group 32, all layers: 4-bit MatMul weights, Convolutions int8 (backup)",
}

# Element types of stored weights that mean "quantized" (decompressed by Convert -> [Subtract] -> Multiply).
LOW_PRECISION_TYPES = {"i8", "u8", "i4", "u4", "nf4", "f4e2m1", "f8e4m3", "f8e5m2", "f8e8m0"}
# Ops that only move, cut or relabel data: not compute ops, and transparent when tracing a quantized value.
DATA_MOVEMENT = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "StridedSlice", "Gather", "Concat",
                 "Split", "VariadicSplit", "Broadcast", "Tile", "Convert", "ShapeOf", "Pad"}
NOT_COMPUTE = DATA_MOVEMENT | {"Parameter", "Result", "Constant", "FakeQuantize", "FakeConvert"}
QUANTIZERS = {"FakeQuantize", "FakeConvert"}
WEIGHTED = {"MatMul", "Convolution", "GroupConvolution"}
# SmoothQuant (on by default for ModelType.TRANSFORMER, alpha 0.95) puts a per-channel Multiply in front of
# each MatMul's FakeQuantize. OpenVINO 2026.4's CPU plugin computes ReduceMean -> Multiply(per-channel) ->
# FakeQuantize wrongly (the Multiply collapses to its first channel's scale), which wrecks every mean-pooled
# ViT head (measured: 6 dB SQNR instead of 26 dB); the smoothing also only pays off for LLM-style outlier
# channels. -1 is NNCF's documented "off".
NO_SMOOTH_QUANT = {"matmul": -1.0, "convolution": -1.0}


def quantize(fp32_artifact: Path, out: Path, spec: QuantSpec,
             calibration: Sequence[Sequence[np.ndarray]]) -> dict[str, Any]:
    """Quantize the IR at ``fp32_artifact`` with NNCF as ``spec`` asks; write the IR at ``out`` (.xml)."""
    import openvino as ov

    model = ov.Core().read_model(str(fp32_artifact))
    spec = spec.with_method(METHODS)  # "auto": this tool's default
    if spec.precision == "int8":
        model, info = quantize_int8(model, spec, calibration)
    else:
        model, info = compress_weights(model, spec.precision)
    # The fp32 artifact's float tensors must stay float32 (compress_to_fp16 would halve the float weights).
    ov.save_model(model, str(out), compress_to_fp16=False)
    written = ov.Core().read_model(str(out))
    quantized, floating, notes = count_ops(written)
    return {
        "tool": info.pop("tool"),
        "versions": {name: version(name) for name in ("openvino", "nncf")},
        "weights": info.pop("weights"),
        "activations": info.pop("activations"),
        "quantized_ops": quantized,
        "float_ops": floating,
        "notes": info.pop("notes") + notes,
    }


def quantize_int8(model: "ov.Model", spec: QuantSpec,
                  calibration: Sequence[Sequence[np.ndarray]]) -> tuple["ov.Model", dict[str, Any]]:
    """``nncf.quantize`` with the scheme's model type / preset and the method's range estimator."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    if not calibration:
        raise EdgevitError("OpenVINO int8 needs calibration samples (got none)")
    estimator, described = activation_range_estimator(spec.method)
    safe = spec.scheme == "safe"
    # MIXED (NNCF's transformer default) keeps the skewed post-GELU/post-LayerNorm activations asymmetric;
    # "full" targets integer-only accelerators, whose kernels want symmetric activations (PERFORMANCE).
    preset = nncf.QuantizationPreset.MIXED if safe else nncf.QuantizationPreset.PERFORMANCE
    dataset = nncf.Dataset(list(calibration), lambda sample: [np.asarray(a, dtype=np.float32) for a in sample])
    quantized = nncf.quantize(
        model, dataset,
        preset=preset,
        model_type=nncf.ModelType.TRANSFORMER if safe else None,
        subset_size=len(calibration),
        advanced_parameters=AdvancedQuantizationParameters(
            activations_range_estimator_params=getattr(RangeEstimatorParametersSet, estimator),
            smooth_quant_alphas=AdvancedSmoothQuantParameters(**NO_SMOOTH_QUANT),
        ),
    )
    symmetry = "asymmetric (symmetric into activation x activation MatMuls)" if safe else "symmetric"
    notes = [f"calibrated on {len(calibration)} samples; NNCF fast bias correction applied"]
    if safe:
        notes.append("safe = nncf.ModelType.TRANSFORMER: NNCF keeps the Softmax output float, so attention's "
                     "A.V MatMul stays float (Q.K^T is int8); its SmoothQuant is switched off (OpenVINO 2026.4 CPU "
                     "computes ReduceMean -> per-channel Multiply -> FakeQuantize wrongly)")
    else:
        notes.append("full = no model type, preset PERFORMANCE: Softmax and Gelu have no int8 form in NNCF "
                     "and stay float")
    return quantized, {
        "tool": f"nncf.quantize(preset={preset.name}, model_type={'TRANSFORMER' if safe else 'None'}, "
                f"activations_range_estimator_params={estimator}, smooth_quant_alphas=-1) -> openvino.save_model",
        # NNCF's default overflow fix halves the first layer's weight range so u8 x i8 products cannot
        # saturate the int16 accumulators of CPUs without VNNI.
        "weights": "int8 per-channel symmetric (i8 constants + dequantizing Multiply); the first layer's "
                   "weights use 7 bits (NNCF overflow fix)",
        "activations": f"int8 per-tensor {symmetry}, FakeQuantize 256 levels, {described}",
        "notes": notes,
    }


def activation_range_estimator(method: str) -> tuple[str, str]:
    """The ``RangeEstimatorParametersSet`` member for the calibration ``method``, and how the manifest says it."""
    if method == "percentile":
        # MEAN_QUANTILE: each sample's 1e-4 and 1-1e-4 quantiles (NNCF's default outlier probability), averaged.
        return "MEAN_QUANTILE", "range = mean over samples of the 0.01%/99.99% quantiles"
    if method == "minmax":
        return "MINMAX", "range = global min/max over the calibration samples"
    # NNCF's only histogram estimator (HISTOGRAM) minimises the L2 quantization error, not KL divergence.
    raise EdgevitError("OpenVINO (NNCF) has no entropy (KL-divergence) calibration; "
                       "use --calibration-method percentile or minmax")


def compress_weights(model: "ov.Model", precision: str) -> tuple["ov.Model", dict[str, Any]]:
    """``nncf.compress_weights``: int8 per channel (w8) or 4-bit in blocks of 32 (w4); data-free."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    if precision == "w8":
        # INT8 modes compress every MatMul, Convolution and embedding weight (no ratio, no backup layers).
        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_SYM)
        return compressed, {
            "tool": "nncf.compress_weights(mode=INT8_SYM) -> openvino.save_model",
            "weights": "int8 per-channel symmetric, fp16 scales (MatMul and Convolution)",
            "activations": "float",
            "notes": [],
        }
    # all_layers: without it NNCF keeps the first and last MatMul in the 8-bit backup mode. ADJUST with the
    # default minimum group of 32 sends a MatMul whose input channels are not a multiple of 32 to the backup
    # mode (NNCF's default fallback, ERROR, would refuse the whole model).
    compressed = nncf.compress_weights(
        model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=32, ratio=1.0, all_layers=True,
        backup_mode=nncf.BackupMode.INT8_ASYM,
        advanced_parameters=AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST),
    )
    return compressed, {
        "tool": "nncf.compress_weights(mode=INT4_SYM, group_size=32, ratio=1.0, all_layers=True, "
                "backup_mode=INT8_ASYM, group_size_fallback_mode=ADJUST) -> openvino.save_model",
        "weights": "int4 symmetric, one fp16 scale per block of 32 input channels; Convolution (and MatMuls "
                   "whose input channels are not a multiple of 32) int8 per-channel asymmetric",
        "activations": "float",
        "notes": [],
    }


# --- reading the written IR -------------------------------------------------------------------------------


def count_ops(model: "ov.Model") -> tuple[dict[str, int], dict[str, int], list[str]]:
    """{op type: count} of compute ops that consume quantized values, of those that stay float, and notes."""
    graph = IRGraph(model)
    quantized: Counter[str] = Counter()
    floating: Counter[str] = Counter()
    for node, is_quantized in graph.op_precisions().items():
        (quantized if is_quantized else floating)[node.get_type_name()] += 1
    weight_types = Counter(f"{node.get_type_name()} {graph.weight_type(node)}" for node in graph.nodes
                           if node.get_type_name() in WEIGHTED and graph.weight_type(node))
    bias_adds = sum(graph.is_bias_add(node) for node in graph.nodes)
    notes = []
    if weight_types:
        notes.append("stored weight types: " + ", ".join(f"{k} x{n}" for k, n in sorted(weight_types.items())))
    if bias_adds:
        notes.append(f"{bias_adds} bias Adds counted with their MatMul/Convolution (OpenVINO fuses them in)")
    return dict(sorted(quantized.items())), dict(sorted(floating.items())), notes


class IRGraph:
    """Which ops of an IR compute, and which of their inputs are quantized (one topological pass)."""

    def __init__(self, model: "ov.Model") -> None:
        self.nodes = list(model.get_ordered_ops())  # topological order: producers before consumers
        # Nodes that only depend on constants (weights, their decompression chains, shape arithmetic),
        # mapped to the low-precision element type they start from ("" for plain float/shape constants).
        self.constant_type: dict[str, str] = {}
        for node in self.nodes:
            kind = node.get_type_name()
            if kind == "Constant":
                element = node.get_element_type().get_type_name()
                self.constant_type[node.get_name()] = element if element in LOW_PRECISION_TYPES else ""
            elif kind not in ("Parameter", "ShapeOf") and node.get_input_size() > 0 and all(
                    self.source(port).get_name() in self.constant_type for port in node.inputs()):
                self.constant_type[node.get_name()] = max(
                    (self.constant_type[self.source(port).get_name()] for port in node.inputs()), key=len)

    @staticmethod
    def source(port: Any) -> Any:
        return port.get_source_output().get_node()

    def is_constant(self, node: Any) -> bool:
        return node.get_name() in self.constant_type

    def op_precisions(self) -> dict[Any, bool]:
        """Every compute op -> whether it consumes a quantized value (an activation through a FakeQuantize,
        or a weight stored in a low-precision type)."""
        return {node: any(self.is_quantized_value(self.source(port)) for port in node.inputs())
                for node in self.nodes if self.is_compute(node)}

    def is_compute(self, node: Any) -> bool:
        """An op that computes on activations (not data movement, constants, quantizers or a layer's bias)."""
        return not (node.get_type_name() in NOT_COMPUTE or self.is_constant(node) or self.is_bias_add(node))

    def is_quantized_value(self, node: Any) -> bool:
        """A FakeQuantize output reached through data-movement ops, or a weight decompressed from a
        low-precision constant."""
        while node.get_type_name() in DATA_MOVEMENT and not self.is_constant(node):
            node = self.source(node.input(0))
        if node.get_type_name() in QUANTIZERS:
            return True
        return bool(self.constant_type.get(node.get_name()))

    def weight_type(self, node: Any) -> str:
        """The low-precision element type of ``node``'s stored weight ("" when float or none)."""
        return max((self.constant_type.get(self.source(port).get_name(), "") for port in node.inputs()), key=len)

    def is_bias_add(self, node: Any) -> bool:
        """An Add of a float constant straight onto a MatMul/Convolution output: the layer's bias."""
        if node.get_type_name() != "Add":
            return False
        sources = [self.source(port) for port in node.inputs()]
        return (any(s.get_type_name() in WEIGHTED for s in sources)
                and any(self.constant_type.get(s.get_name()) == "" for s in sources))
