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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _topk(a: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-a, axis=-1)[..., :k]


def compare_output(name: str, ref: np.ndarray, out: np.ndarray, tol: Tolerance) -> OutputParity:
    """Parity of one output; ``ref``/``out`` stack every sample on axis 0."""
    if ref.shape != out.shape:
        raise ValueError(f"output '{name}': artifact shape {list(out.shape)} != PyTorch {list(ref.shape)}")
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    err = np.abs(out64 - ref64)
    peak = float(np.abs(ref64).max())
    max_abs = float(err.max())
    max_rel = float((err / np.maximum(np.abs(ref64), 1e-12)).max())
    cosine = float(np.dot(ref64.ravel(), out64.ravel()) / (np.linalg.norm(ref64) * np.linalg.norm(out64) + 1e-300))
    top1 = top5 = None
    if ref.ndim >= 2 and ref.shape[-1] >= 5:  # class scores on the last axis
        r2, o2 = ref64.reshape(-1, ref.shape[-1]), out64.reshape(-1, ref.shape[-1])
        ref_top5, out_top5 = _topk(r2, 5), _topk(o2, 5)
        top1 = float(np.mean(ref_top5[:, 0] == out_top5[:, 0]))
        top5 = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ref_top5, out_top5)]))
    passed = bool(max_abs <= tol.max_abs_rel_to_peak * max(peak, 1e-12) and cosine >= tol.min_cosine)
    return OutputParity(name, list(ref.shape), max_abs, max_rel, peak, cosine, top1, top5, passed)


@dataclass
class ParityReport:
    """The parity verdict of one artifact: ``status`` is passed, failed, skipped or converted-not-verified."""

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

    @property
    def passed(self) -> bool:
        return self.status != "failed"

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
    status = "passed" if all(r.passed for r in results) else "failed"
    return ParityReport(status, precision, len(refs), asdict(tol), results)
