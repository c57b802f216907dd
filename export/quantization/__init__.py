"""Quantization: what edgevit asks each backend's own quantizer for, and how it judges the result.

Precisions (the targets table lists which target has which):

- ``int8``: static W8A8 with calibration data. Weights per-channel symmetric int8, activations
  per-tensor int8 from calibration statistics. Scheme ``safe`` (default) quantizes only the
  matrix-multiplying ops (Linear/Conv/MatMul) and keeps LayerNorm, Softmax, GELU and residual adds in
  float; scheme ``full`` quantizes every op the backend's tool can (integer-only accelerators need it).
- ``w8``: weight-only int8, data-free; activations stay float.
- ``w4``: 4-bit weights (per-block scales, or a 16-entry palette) where the backend has them; data-free.

Each backend implements ``export/backends/<name>/quantize.py``::

    PRECISIONS: dict[str, str]   # precision -> what the backend's tool does for it (one line)
    METHODS: tuple[str, ...]     # the int8 calibration methods its tool has; the first is the default
    def quantize(fp32_artifact: Path, out: Path, spec: QuantSpec,
                 calibration: Sequence[Sequence[np.ndarray]]) -> dict[str, Any]

``quantize`` reads the fp32 artifact the backend's converter wrote and writes the quantized artifact
to ``out`` (same suffix) with the vendor's tool. ``calibration`` is a list of samples, each the model's
inputs in order as float32 arrays (empty for the data-free precisions). It returns the facts the
manifest records (:data:`INFO_KEYS`). A precision or scheme the backend cannot do is a one-line
:class:`~edgevit.errors.EdgevitError`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from edgevit.errors import EdgevitError

#: the quantized precisions, in the order the CLI lists them
QUANTIZED = ("int8", "w8", "w4")
#: which of them need calibration data (activation ranges)
CALIBRATED = ("int8",)
SCHEMES = ("safe", "full")
CALIBRATION_METHODS = ("auto", "percentile", "entropy", "minmax")  # auto: the backend's first METHODS entry
#: the keys of the dict a backend's quantize() returns
INFO_KEYS = (
    "tool",  # the vendor functions called, e.g. "onnxruntime.quantization.quantize_static (QDQ)"
    "versions",  # {package: version} of the tool
    "weights",  # e.g. "int8 per-channel symmetric"
    "activations",  # e.g. "int8 per-tensor, percentile 99.999" or "float" (weight-only)
    "quantized_ops",  # {op type: count} of compute ops that now run on quantized values
    "float_ops",  # {op type: count} of compute ops that stayed float (the manifest says which)
    "notes",  # [str]: anything a user should know (e.g. "Core ML int8 activations calibrated with ...")
)
#: what a quantizer may add to INFO_KEYS: the quantized-graph passes that ran (export/quantization/passes.py),
#: the runtime settings the artifact must be loaded with to run as measured ("session_config"), and which int8
#: region LiteRT's `safe` scheme kept on XNNPACK ("int8_region", export/backends/tflite/int8_region.py)
OPTIONAL_INFO_KEYS = ("passes", "session_config", "int8_region")


@dataclass(frozen=True)
class QuantSpec:
    """What to ask the backend's quantizer for."""

    precision: str  # one of QUANTIZED
    scheme: str = "safe"  # int8 only: "safe" (transformer-safe preset) or "full"
    method: str = "auto"  # int8 only: how activation ranges are calibrated ("auto": the backend's default)
    accelerator: str | None = None  # the accelerator the artifact is for: its quantized-graph passes run

    def __post_init__(self) -> None:
        if self.precision not in QUANTIZED:
            raise EdgevitError(f"'{self.precision}' is not a quantized precision; choose one of: {', '.join(QUANTIZED)}")
        if self.scheme not in SCHEMES:
            raise EdgevitError(f"unknown --quant-scheme '{self.scheme}'; choose one of: {', '.join(SCHEMES)}")
        if self.method not in CALIBRATION_METHODS:
            raise EdgevitError(f"unknown --calibration-method '{self.method}'; "
                               f"choose one of: {', '.join(CALIBRATION_METHODS)}")

    @property
    def calibrated(self) -> bool:
        return self.precision in CALIBRATED

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_method(self, methods: tuple[str, ...]) -> "QuantSpec":
        """This spec with ``method="auto"`` replaced by the backend's default (the first of its ``methods``)."""
        return replace(self, method=methods[0]) if self.method == "auto" else self


def check_request(spec: QuantSpec, calibration_given: bool, max_drop: float) -> None:
    """The argument errors shared by the CLI's early check and the API's: data the precision needs, --max-drop."""
    if spec.calibrated and not calibration_given:
        raise EdgevitError(f"--precision {spec.precision} needs calibration data: --calibration DIR (a folder of "
                           "images the model will see)")
    if max_drop < 0:
        raise EdgevitError(f"--max-drop must be >= 0 (top-1 points), got {max_drop:g}")


def is_quantized(precision: str) -> bool:
    return precision in QUANTIZED
