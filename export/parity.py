"""Conversion parity: compare an artifact's outputs with PyTorch's, with tolerances set per precision.

Tolerances come from the arithmetic, not from what passed:
- fp32: unit roundoff 2**-24 ~ 6e-8. A converter reorders sums (blocked GEMMs, fused LayerNorm) so each
  K-term dot product may differ by ~sqrt(K) ulps (K <= 3072 here: ~50 ulps ~ 3e-6 relative), and
  normalisation layers re-amplify differences through tens of blocks. 1e-4 of the output's peak
  magnitude leaves ~30x headroom over that and still catches any real bug (a wrong op is >= 1e-2).
- fp16: unit roundoff 2**-11 ~ 4.9e-4, i.e. 200x fp32; the same argument gives 2e-2 of the peak.
Cosine similarity complements the peak bound: a real bug rotates the output vector.

Top-1/top-5 agreement is reported, not gated: flipping a top-1 whose margin over the runner-up is m
needs an error of at least m/2, so any flip on a clear margin already fails the peak bound, and a
flip within the bound is a near-tie resolved differently by rounding.

Degenerate outputs: both bounds are relative to the reference, so they cannot judge a reference whose
peak is 0 or below float32's smallest normal number (``np.finfo(np.float32).tiny`` ~ 1.2e-38: a
denormal peak has lost its own precision, and a model whose outputs shrank there, e.g. a deep network
with tiny random init, would let any artifact "pass" against ~0). So:
- outputs identical to the reference (bit for bit, identical zeros included) pass, with cosine 1;
- otherwise a reference with a zero or denormal peak (or NaN/Inf values) makes the report's status
  ``degenerate``: neither a pass nor a failure, with a detail saying what to do (load trained weights,
  or re-initialise with ``init="exercise"``). The tolerances are not loosened for it. A real failure
  on another output still makes the report ``failed``. The CLI exits 1 on ``degenerate``, as on
  ``failed``: the artifact was not shown to match; ``export_model`` returns (``result.ok`` is False)
  and logs a warning instead of raising ``ParityError``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    max_abs_rel_to_peak: float  # max |out - ref| / max |ref|
    min_cosine: float


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs_rel_to_peak=1e-4, min_cosine=0.99999),
    "fp16": Tolerance(max_abs_rel_to_peak=2e-2, min_cosine=0.999),
}


@dataclass
class OutputParity:
    """Errors of one output tensor over all parity samples."""

    name: str
    shape: list[int]
    max_abs_err: float
    max_rel_err: float
    peak: float
    cosine: float
    top1_agreement: float | None
    top5_agreement: float | None
    passed: bool
    degenerate: str = ""  # why parity cannot judge this output (see the module docstring), else ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _topk(a: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-a, axis=-1)[..., :k]


def compare_output(name: str, ref: np.ndarray, out: np.ndarray, tol: Tolerance) -> OutputParity:
    """Parity of one output; ``ref``/``out`` stack every sample on axis 0."""
    if ref.shape != out.shape:
        raise ValueError(f"output '{name}': artifact shape {list(out.shape)} != PyTorch {list(ref.shape)}")
    if ref.size == 0:
        raise ValueError(f"output '{name}' is empty (shape {list(ref.shape)}): parity has nothing to compare")
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    err = np.abs(out64 - ref64)
    peak = float(np.abs(ref64).max())
    max_abs = float(err.max())
    max_rel = float((err / np.maximum(np.abs(ref64), 1e-12)).max())
    identical = bool(np.array_equal(ref64, out64))
    cosine = 1.0 if identical else float(
        np.dot(ref64.ravel(), out64.ravel()) / (np.linalg.norm(ref64) * np.linalg.norm(out64) + 1e-300))
    degenerate = "" if identical else _degenerate(ref64, peak)
    top1 = top5 = None
    if ref.ndim >= 2 and ref.shape[-1] >= 5:  # class scores on the last axis
        r2, o2 = ref64.reshape(-1, ref.shape[-1]), out64.reshape(-1, ref.shape[-1])
        ref_top5, out_top5 = _topk(r2, 5), _topk(o2, 5)
        top1 = float(np.mean(ref_top5[:, 0] == out_top5[:, 0]))
        top5 = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ref_top5, out_top5)]))
    passed = identical or bool(
        not degenerate and max_abs <= tol.max_abs_rel_to_peak * peak and cosine >= tol.min_cosine)
    return OutputParity(name, list(ref.shape), max_abs, max_rel, peak, cosine, top1, top5, passed, degenerate)


DEGENERATE_DETAIL = ('reference output is degenerate: parity cannot judge this model; '
                     'load trained weights (or init="exercise")')


def _degenerate(ref64: np.ndarray, peak: float) -> str:
    """Why a (non-identical) comparison against ``ref64`` cannot be judged, or "" when it can."""
    if not np.isfinite(ref64).all():
        return "reference output has NaN/Inf values: parity cannot judge this model; check its weights and inputs"
    if peak < np.finfo(np.float32).tiny:  # 0, or denormal in float32
        return f"{DEGENERATE_DETAIL} (its peak |value| is {peak:.3g})"
    return ""


@dataclass
class ParityReport:
    """The parity verdict of one artifact: ``status`` is passed, failed, degenerate, skipped or
    converted-not-verified."""

    status: str
    precision: str
    samples: int = 0
    tolerance: dict[str, float] | None = None
    outputs: list[OutputParity] | None = None
    runtime: dict[str, Any] | None = None
    median_ms: float | None = None
    detail: str = ""
    verification: str = ""  # how the numbers were checked, in words (e.g. "verified (reference executor, ...)")
    checks: list[dict[str, Any]] | None = None  # every check that ran, when there are several (Core ML)
    fp16_range: dict[str, Any] | None = None  # Core ML: ops that overflow/underflow/lose precision in fp16
    quantization: dict[str, Any] | None = None  # quantized artifacts: the manifest's "quantization" record

    @property
    def passed(self) -> bool:
        return self.status not in ("failed", "degenerate")

    def worst(self, key: str) -> float | None:
        """The worst value of an error metric over outputs (max for errors, min for similarities)."""
        if not self.outputs:
            return None
        values = [getattr(o, key) for o in self.outputs if getattr(o, key) is not None]
        if not values:
            return None
        return min(values) if key in ("cosine", "top1_agreement", "top5_agreement") else max(values)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["outputs"] = [o.to_dict() for o in self.outputs] if self.outputs else None
        d.pop("quantization")  # the manifest's own top-level section
        return d


def compare(
    refs: list[list[np.ndarray]], outs: list[list[np.ndarray]], names: list[str], precision: str
) -> ParityReport:
    """Compare per-sample output lists (``refs[sample][output]``) and build the report."""
    tol = TOLERANCES[precision]
    results = [
        compare_output(name, np.stack([r[i] for r in refs]), np.stack([o[i] for o in outs]), tol)
        for i, name in enumerate(names)
    ]
    failed = [r for r in results if not r.passed and not r.degenerate]
    degenerate = [r for r in results if r.degenerate]
    if failed or not degenerate:
        return ParityReport("failed" if failed else "passed", precision, len(refs), asdict(tol), results)
    detail = "; ".join(f"output '{r.name}': {r.degenerate}" for r in degenerate)
    return ParityReport("degenerate", precision, len(refs), asdict(tol), results, detail=detail)
