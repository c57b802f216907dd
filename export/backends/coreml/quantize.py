"""Core ML quantization with Apple's own tool, ``coremltools.optimize.coreml``, on the fp32 .mlpackage.

Per precision (edgevit only chooses the options; every quantized number is coremltools'):

- ``w8``: ``linear_quantize_weights``, ``linear_symmetric`` int8, per output channel: each Linear / Conv /
  MatMul weight becomes int8 + a scale per channel, dequantized once at load (``constexpr_affine_dequantize``
  in iOS17 programs, ``constexpr_blockwise_shift_scale`` in iOS18 ones); activations stay float.
- ``w4``: ``linear_quantize_weights`` int4 ``per_block`` (32 input channels per scale) needs an iOS18
  program (``constexpr_blockwise_shift_scale``). edgevit's packages target iOS17, where coremltools
  refuses it ("The per_block quantization is supported since iOS18"), so the fallback is
  ``palettize_weights`` 4-bit ``kmeans``, one 16-entry palette per weight tensor
  (``constexpr_lut_to_dense``); ``info["tool"]`` says which one ran.
- ``int8`` (W8A8): ``linear_quantize_activations`` inserts ``quantize``/``dequantize`` pairs (int8,
  per tensor, symmetric) on the inputs and outputs of the ops coremltools quantizes, then
  ``linear_quantize_weights`` int8 per channel as for ``w8``. Scheme ``safe``: coremltools' patterns
  are conv, linear, add, avg_pool and max_pool; ``add`` (residuals) and the pools are excluded through
  ``OptimizationConfig.op_type_configs`` (None), so only conv/linear run on int8 activations. The
  tool has no activation pattern for ``matmul``/``einsum``: attention's activation x activation
  products stay float in both schemes. Scheme ``full``: every pattern coremltools has (its default).

Calibration on Linux: coremltools gets activation ranges by running Core ML with every intermediate
tensor as an extra output (``_get_activation_calibration_stats``), which needs macOS. edgevit computes
the same ``{tensor: {"rmin", "rmax"}}`` dict by running the package in its MIL reference executor
with an observer, and hands it to ``linear_quantize_activations`` in place of that function. Methods:
``minmax`` = min/max over all samples (coremltools' own statistic; its recorder keeps only the last
sample's range, edgevit's the range over all of them); ``percentile`` = ranges clipped to the 99.999th
percentile of |x| per tensor over all samples. coremltools has no histogram (``entropy``) calibration:
a one-line error. (coremltools 9 also reads each range as float16 and then builds float16 output
scales that an fp32 program's ``quantize`` rejects; for fp32 programs the range goes in as float32.)

The written package keeps the fp32 package's float32 inputs and outputs; on Linux it is run (and
judged) by the MIL reference executor, which implements the ops above (:mod:`.mil.ops_quant`).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Sequence
from unittest import mock

import numpy as np

from edgevit.errors import EdgevitError
from edgevit.export.backends.coreml.mil import MILExecutor, MILProgram, load_program
from edgevit.export.backends.coreml.mil.executor import Ref, Step
from edgevit.export.quantization import QuantSpec

METHODS = ("percentile", "minmax")  # ranges from the MIL executor: a percentile of |x|, or min/max

#: the packages whose versions decide a quantized artifact's bytes (the bench's export cache key)
PACKAGES = ("coremltools",)

PRECISIONS = {
    "int8": "W8A8: coremltools linear_quantize_activations (int8 per-tensor quantize/dequantize, ranges from "
            "edgevit's MIL executor) + linear_quantize_weights int8 per-channel symmetric",
    "w8": "coremltools linear_quantize_weights: int8 per-channel symmetric weights, float activations",
    "w4": "coremltools linear_quantize_weights int4 per-block 32 (iOS18 programs), else palettize_weights "
          "4-bit k-means (one 16-entry palette per weight)",
}

#: the ops whose weights are quantized: the matrix-multiplying ones (any size; other constants stay float)
WEIGHT_OPS = ("conv", "conv_transpose", "linear", "matmul")
#: coremltools' activation patterns that the transformer-safe preset leaves float (residual adds, pools)
SAFE_EXCLUDED = ("add", "avg_pool", "max_pool")
PERCENTILE = 99.999
BLOCK_SIZE = 32
#: the patterns coremltools' activation pass quantizes (insert_prefix_quantize_dequantize_pair) and the
#: activations its output pass fuses into them (insert_suffix_quantize_dequantize_pair)
ACTIVATION_PATTERNS = ("conv", "linear", "add", "avg_pool", "max_pool")
FUSED_ACTIVATIONS = ("leaky_relu", "tanh", "scaled_tanh", "sigmoid", "hard_sigmoid", "relu", "relu6")
#: ops that move or describe data without computing on it (not counted as quantized or float ops)
DATA_MOVEMENT = frozenset({
    "reshape", "transpose", "squeeze", "expand_dims", "flatten2d", "slice_by_index", "slice_by_size", "concat",
    "split", "stack", "tile", "pad", "reverse", "gather", "gather_nd", "gather_along_axis", "shape", "identity",
    "cast", "fill", "range_1d", "band_part", "pixel_shuffle", "pixel_unshuffle", "space_to_depth",
    "depth_to_space", "quantize", "dequantize",
})


def quantize(fp32_artifact: Path, out: Path, spec: QuantSpec,
             calibration: Sequence[Sequence[np.ndarray]]) -> dict[str, Any]:
    """Write the quantized package of ``fp32_artifact`` to ``out``; return the manifest's facts (INFO_KEYS)."""
    ct = _coremltools()
    model = ct.models.MLModel(str(fp32_artifact), skip_model_load=True)  # Linux: no Core ML to load into
    spec = spec.with_method(METHODS)  # "auto": this tool's default
    if spec.precision == "w8":
        quantized, info = _weights_int8(model), _w8_info()
    elif spec.precision == "w4":
        quantized, info = _weights_4bit(model)
    else:
        quantized, info = _int8(model, Path(fp32_artifact), spec, calibration)
    quantized.save(str(out))
    written = load_program(out)
    quantized_ops, float_ops = count_ops(written)
    stored = ", ".join(op for op in written.op_types() if op.startswith("constexpr_")) or "none compressed"
    return {
        "tool": info["tool"],
        "versions": _versions(info.get("packages", ("coremltools",))),
        "weights": f"{info['weights']} ({stored})",
        "activations": info["activations"],
        "quantized_ops": quantized_ops,
        "float_ops": float_ops,
        "notes": info["notes"],
    }


# --- the three precisions ---------------------------------------------------------------------------


def weight_consts(model: Any) -> list[str]:
    """Names of the const ops holding WEIGHT_OPS weights (rank >= 2: coremltools never compresses 1-D)."""
    main = model.get_spec().mlProgram.functions["main"]
    operations = main.block_specializations[main.opset].operations
    consts = {op.outputs[0].name: _op_name(op) for op in operations
              if op.type == "const" and op.outputs[0].type.tensorType.rank >= 2}
    return sorted({consts[binding.name] for op in operations if op.type in WEIGHT_OPS
                   for argument in op.inputs.values() for binding in argument.arguments if binding.name in consts})


def _op_name(op: Any) -> str:
    name = op.attributes.get("name")
    return name.immediateValue.tensor.strings.values[0] if name is not None else op.outputs[0].name


def _weight_config(model: Any, op_config: Any) -> Any:
    """An OptimizationConfig that compresses the weights of WEIGHT_OPS only, whatever their size.

    By const name, not op type: the converter shares equal constants between ops (a zero bias is also a
    LayerNorm's beta), and coremltools refuses a const whose consumers' op-type configs differ."""
    import coremltools.optimize as cto

    return cto.coreml.OptimizationConfig(op_name_configs={name: op_config for name in weight_consts(model)})


def _weights_int8(model: Any) -> Any:
    import coremltools.optimize as cto

    op_config = cto.coreml.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                                   weight_threshold=0)
    return cto.coreml.linear_quantize_weights(model, _weight_config(model, op_config))


def _w8_info() -> dict[str, Any]:
    return {
        "tool": "coremltools.optimize.coreml.linear_quantize_weights (linear_symmetric, int8, per_channel)",
        "weights": "int8 per-channel symmetric",
        "activations": "float",
        "notes": [_weight_note()],
    }


def _weight_note() -> str:
    return (f"weights of {'/'.join(WEIGHT_OPS)} ops quantized whatever their size (weight_threshold=0); other "
            "constants (e.g. position embeddings) and 1-D tensors (biases, norms) stay float")


def _weights_4bit(model: Any) -> tuple[Any, dict[str, Any]]:
    """int4 per-block where the program's opset has it (iOS18), else a 4-bit palette per tensor."""
    import coremltools.optimize as cto

    try:
        op_config = cto.coreml.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                                       block_size=BLOCK_SIZE, weight_threshold=0)
        quantized = cto.coreml.linear_quantize_weights(model, _weight_config(model, op_config))
        return quantized, {
            "tool": f"coremltools.optimize.coreml.linear_quantize_weights (linear_symmetric, int4, per_block "
                    f"{BLOCK_SIZE})",
            "weights": f"int4 symmetric, one scale per block of {BLOCK_SIZE} input channels",
            "activations": "float",
            "notes": [_weight_note(), f"weights whose input channels are not a multiple of {BLOCK_SIZE} are "
                                      "skipped by coremltools and stay float"],
        }
    except ValueError as exc:
        if "iOS18" not in str(exc):
            raise
        refusal = str(exc).split(". ")[0]
    palette = cto.coreml.OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_tensor", weight_threshold=0)
    return cto.coreml.palettize_weights(model, _weight_config(model, palette)), {
        "tool": "coremltools.optimize.coreml.palettize_weights (kmeans, nbits=4, per_tensor)",
        "weights": "4-bit palette: 16 k-means centroids per weight tensor",
        "activations": "float",
        "packages": ("coremltools", "scikit-learn"),  # coremltools' k-means is scikit-learn's
        "notes": [_weight_note(), f"int4 per-block {BLOCK_SIZE} was refused for this iOS17 package "
                                  f"(coremltools: '{refusal}'); palettization used instead"],
    }


def _int8(model: Any, fp32_artifact: Path, spec: QuantSpec,
          calibration: Sequence[Sequence[np.ndarray]]) -> tuple[Any, dict[str, Any]]:
    """W8A8: activation quantize/dequantize pairs from executor-calibrated ranges, then int8 weights."""
    import coremltools.optimize as cto

    if spec.method == "entropy":
        raise EdgevitError("Core ML int8 cannot calibrate with 'entropy': coremltools calibrates activation "
                           "ranges by min/max only; use --calibration-method percentile or minmax")
    if not calibration:
        raise EdgevitError("Core ML int8 needs calibration samples (activation ranges); none were given")
    program = load_program(fp32_artifact)
    stats = activation_ranges(program, calibration, spec.method)
    samples = [dict(zip(program.inputs, sample)) for sample in calibration]
    with contextlib.ExitStack() as patches:
        # coremltools would measure the ranges by Core ML predictions (macOS only): hand it the executor's
        patches.enter_context(mock.patch(
            "coremltools.optimize.coreml._post_training_quantization._get_activation_calibration_stats",
            return_value=stats))
        if not _is_fp16_program(model):
            patches.enter_context(_fp32_ranges())
        activated = cto.coreml.linear_quantize_activations(model, _activation_config(spec.scheme), samples)
    return _weights_int8(activated), _int8_info(spec, len(calibration))


def _activation_config(scheme: str) -> Any:
    """int8 per-tensor symmetric on coremltools' patterns; "safe" switches off add and the pools (None)."""
    import coremltools.optimize as cto

    activation = cto.coreml.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_tensor")
    excluded = SAFE_EXCLUDED if scheme == "safe" else ()
    return cto.coreml.OptimizationConfig(global_config=activation, op_type_configs={op: None for op in excluded})


def _int8_info(spec: QuantSpec, n_samples: int) -> dict[str, Any]:
    method = f"{PERCENTILE}th percentile of |x| per tensor" if spec.method == "percentile" else "min/max per tensor"
    scheme = ("scheme safe: coremltools' add/avg_pool/max_pool patterns excluded, only conv/linear take int8 "
              "activations (their outputs are requantized to int8 too, coremltools' int8-in/int8-out pattern, "
              "before the float ops reading them)" if spec.scheme == "safe" else
              "scheme full: every coremltools activation pattern (conv, linear, add, avg_pool, max_pool)")
    return {
        "tool": "coremltools.optimize.coreml.linear_quantize_activations (linear_symmetric, int8, per_tensor; "
                "ranges from edgevit's MIL executor) + linear_quantize_weights (linear_symmetric, int8, "
                "per_channel)",
        "weights": "int8 per-channel symmetric",
        "activations": f"int8 per-tensor symmetric (quantize/dequantize), ranges: {method} over "
                       f"{n_samples} calibration samples",
        "notes": [
            f"Core ML int8 activations calibrated with edgevit's MIL reference executor ({spec.method}) in place "
            "of coremltools' Core ML predictions (macOS only)",
            scheme,
            "coremltools has no activation quantization for matmul/einsum: attention's activation x activation "
            "products, softmax, layer_norm and gelu stay float",
            _weight_note(),
        ],
    }


def _is_fp16_program(model: Any) -> bool:
    """Whether the ML Program computes in fp16 (any fp16-typed op output besides the boundary casts)."""
    main = model.get_spec().mlProgram.functions["main"]
    fp16 = 10  # coremltools.proto.MIL_pb2.DataType.FLOAT16
    return any(op.type != "cast" and out.type.tensorType.dataType == fp16
               for op in main.block_specializations[main.opset].operations for out in op.outputs)


def _fp32_ranges() -> Any:
    """coremltools 9 reads each range as float16 (``get_min_and_max_values``); its output (suffix) pass then
    builds float16 scales, which an fp32 program's ``quantize`` rejects ("scale has dtype fp16 whereas input
    has dtype fp32"; the input pass casts its scales to the input's dtype, the output pass does not). For
    fp32 programs the range is handed over in float32: the scales coremltools computes from it are then
    fp32, as its input pass makes them."""
    from coremltools.optimize import _utils

    original = _utils.get_min_and_max_values

    def float32_range(activation_stats: dict, var_name: str) -> np.ndarray:
        original(activation_stats, var_name)  # its checks (stats given, name present)
        stats = activation_stats[var_name]
        return np.array([stats["rmin"], stats["rmax"]], dtype=np.float32)

    return mock.patch.object(_utils, "get_min_and_max_values", float32_range)


# --- calibration: coremltools' activation statistics, computed by the MIL executor -----------------


class ActivationRanges:
    """An executor observer collecting, per float tensor, its min, max and the largest |x| values (as many
    as the percentile needs over ``n_samples`` runs), the statistics coremltools' calibration records."""

    def __init__(self, n_samples: int, percentile: float | None) -> None:
        self.n_samples = n_samples
        self.percentile = percentile
        self.low: dict[str, float] = {}
        self.high: dict[str, float] = {}
        self.top: dict[str, np.ndarray] = {}  # descending |x|, the k largest seen so far
        self.size: dict[str, int] = {}

    def record(self, name: str, value: np.ndarray) -> None:
        value = np.asarray(value, dtype=np.float32)
        low, high = float(value.min()), float(value.max())
        self.low[name] = min(low, self.low.get(name, low))
        self.high[name] = max(high, self.high.get(name, high))
        self.size[name] = value.size
        if self.percentile is None:
            return
        keep = _order_statistics_needed(value.size * self.n_samples, self.percentile)
        merged = np.abs(value).ravel()
        if name in self.top:
            merged = np.concatenate([self.top[name], merged])
        if merged.size > keep:
            merged = np.partition(merged, merged.size - keep)[-keep:]
        self.top[name] = np.sort(merged)[::-1]

    def __call__(self, step: Step, kwargs: dict[str, Any], outs: list[Any]) -> None:
        for name, value in zip(step.outputs, outs):
            if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.size:
                self.record(name, value)

    def stats(self) -> dict[str, dict[str, float]]:
        """{tensor: {"rmin", "rmax"}}: min/max, or clipped to +-the percentile of |x| when one is asked."""
        out = {}
        for name in self.low:
            low, high = self.low[name], self.high[name]
            if self.percentile is not None:
                clip = percentile_of_top(self.top[name], self.size[name] * self.n_samples, self.percentile)
                low, high = max(low, -clip), min(high, clip)
            out[name] = {"rmin": low, "rmax": high}
        return out


def _order_statistics_needed(total: int, percentile: float) -> int:
    """How many of the largest values np.percentile(.., percentile) (linear interpolation) reads."""
    lower = math.floor(percentile / 100 * (total - 1))
    return max(total - lower, 1)


def percentile_of_top(top_descending: np.ndarray, total: int, percentile: float) -> float:
    """np.percentile of ``total`` values (default linear interpolation) from their largest ones, descending."""
    position = percentile / 100 * (total - 1)
    lower = math.floor(position)
    below = float(top_descending[total - 1 - lower])
    above = float(top_descending[total - 2 - lower]) if lower + 1 < total else below
    return below + (position - lower) * (above - below)


def activation_ranges(program: MILProgram, calibration: Sequence[Sequence[np.ndarray]],
                      method: str) -> dict[str, dict[str, float]]:
    """coremltools' ``_get_activation_calibration_stats`` result, from edgevit's MIL executor (fp32 mode):
    ranges of the inputs and every float op output (model outputs too: harmless, and never missing), then
    coremltools' own concat adjustment (a concat's inputs and output share one range)."""
    from coremltools.optimize.coreml.experimental._post_training_quantization import (
        _adjust_concat_surrounding_activation_stats,
    )

    observer = ActivationRanges(len(calibration), PERCENTILE if method == "percentile" else None)
    executor = MILExecutor(program, "fp32")
    for sample in calibration:
        for name, value in zip(program.inputs, sample):
            if np.asarray(value).dtype.kind == "f":
                observer.record(name, np.asarray(value))
        executor.run(list(sample), observer=observer)
    stats = observer.stats()
    concats = [[r.name for r in _refs(step.inputs["values"])] + step.outputs[:1]
               for step in program.steps if step.op_type == "concat"]
    _adjust_concat_surrounding_activation_stats(concats, stats)
    return stats


# --- reading the written package --------------------------------------------------------------------


def _refs(value: Any) -> list[Ref]:
    return [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, Ref)]


def count_ops(program: MILProgram) -> tuple[dict[str, int], dict[str, int]]:
    """({op type: count} quantized, {op type: count} float) over the compute ops of a package.

    Quantized: an op reading a compressed weight (a ``constexpr_*`` output), or one of coremltools'
    activation patterns (conv, linear, add, pools, with a fused activation such as relu) that is int8 in
    and int8 out: every activation input from a ``dequantize`` and every consumer a ``quantize`` (the
    dequantize -> op -> quantize pattern Core ML runs in int8). Everything else that computes is float,
    including ops that merely read a dequantized value (gelu after a quantized conv computes in float)
    and pattern ops whose output stays float. Data movement (reshape, transpose, slices, concat,
    quantize/dequantize themselves) is not counted.
    """
    steps = {name: step for step in program.steps for name in step.outputs}
    consumers: dict[str, list[Step]] = {}
    for step in program.steps:
        for value in step.inputs.values():
            for ref in _refs(value):
                consumers.setdefault(ref.name, []).append(step)
    quantized: Counter[str] = Counter()
    floating: Counter[str] = Counter()
    for step in program.steps:
        if step.op_type in DATA_MOVEMENT or step.op_type.startswith("constexpr_"):
            continue
        compressed = any(s.op_type.startswith("constexpr_") for s in _sources(step, steps))
        (quantized if compressed or _int8_pattern(step, steps, consumers) else floating)[step.op_type] += 1
    return dict(sorted(quantized.items())), dict(sorted(floating.items()))


def _sources(step: Step, steps: dict[str, Step]) -> list[Step]:
    """The ops producing ``step``'s non-const inputs (program inputs have none)."""
    return [steps[r.name] for value in step.inputs.values() for r in _refs(value) if r.name in steps]


def _int8_pattern(step: Step, steps: dict[str, Step], consumers: dict[str, list[Step]]) -> bool:
    if step.op_type in FUSED_ACTIVATIONS:  # conv -> relu -> quantize: the activation belongs to the pattern
        return len(_sources(step, steps)) == 1 and _int8_pattern(_sources(step, steps)[0], steps, consumers)
    if step.op_type not in ACTIVATION_PATTERNS:
        return False
    activations = [s for s in _sources(step, steps) if not s.op_type.startswith("constexpr_")]
    if not activations or any(s.op_type != "dequantize" for s in activations):
        return False
    readers = consumers.get(step.outputs[0], [])
    if len(readers) == 1 and readers[0].op_type in FUSED_ACTIVATIONS:
        readers = consumers.get(readers[0].outputs[0], [])
    return bool(readers) and all(r.op_type == "quantize" for r in readers)


# --- plumbing -----------------------------------------------------------------------------------------


def _coremltools() -> Any:
    quiet = io.StringIO()  # its import prints which frameworks it will not convert from
    with contextlib.redirect_stderr(quiet), contextlib.redirect_stdout(quiet):
        import coremltools as ct
        import coremltools.optimize  # noqa: F401
    return ct


def _versions(packages: Sequence[str]) -> dict[str, str]:
    out = {}
    for package in packages:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "unknown"
    return out
