"""The fp16 range report: which ops of a Core ML program will misbehave in the Neural Engine's float16.

The program runs once in fp32 mode. At every op with float outputs, the op is also run locally in fp16:
its fp32-mode inputs rounded to float16, its outputs rounded to float16. Comparing the two isolates what
the op itself does in fp16, given correct inputs (an accumulated comparison would blame every op after
the first bad one). An op is listed when:

- overflow: a float16 output is inf where fp32 was finite (|x| > 65504);
- underflow: at least ``UNDERFLOW_FRACTION`` of its nonzero fp32 outputs become exactly 0 in float16
  (|x| below half the smallest subnormal, 2**-25) -- a variance or a normaliser flushed to 0 divides
  by epsilon next;
- loss: max |fp16 - fp32| over the op's fp32 output peak exceeds ``LOSS_TOLERANCE`` (1e-2: 20 times
  float16's unit roundoff 2**-11, more than rounding the inputs and the output once can explain;
  catastrophic cancellation, large-magnitude sums, exp of large arguments).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgevit.export.backends.coreml.mil.executor import MILExecutor, MILProgram, Step, _normalise, round_fp16
from edgevit.export.backends.coreml.mil.registry import OPS

LOSS_TOLERANCE = 1e-2
UNDERFLOW_FRACTION = 1e-2


@dataclass(frozen=True)
class OpRangeIssue:
    op: str
    op_type: str
    output: str
    shape: list[int]
    overflow: int  # elements inf in fp16, finite in fp32
    underflow: int  # elements 0 in fp16, nonzero in fp32
    nonzero: int
    rel_error: float  # max |fp16 - fp32| / max |fp32| (finite elements)
    fp32_peak: float
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return (f"{self.op_type} {self.op} {self.shape}: {', '.join(self.reasons)} "
                f"(peak {self.fp32_peak:.3g}, rel err {self.rel_error:.2g})")


def _round_inputs(value: Any) -> Any:
    if isinstance(value, list):
        return [_round_inputs(v) for v in value]
    return round_fp16(value)


def _judge(step: Step, name: str, y32: np.ndarray, y16: np.ndarray) -> OpRangeIssue | None:
    finite32 = np.isfinite(y32)
    overflow = int(np.count_nonzero(np.isinf(y16) & finite32))
    nonzero_mask = (y32 != 0) & finite32
    nonzero = int(np.count_nonzero(nonzero_mask))
    underflow = int(np.count_nonzero((y16 == 0) & nonzero_mask))
    both = finite32 & np.isfinite(y16)
    peak = float(np.abs(y32[finite32]).max()) if finite32.any() else 0.0
    err = float(np.abs(y16[both].astype(np.float64) - y32[both]).max()) if both.any() else 0.0
    rel = err / peak if peak > 0 else 0.0
    reasons = []
    if overflow:
        reasons.append(f"overflow: {overflow} inf")
    if nonzero and underflow >= UNDERFLOW_FRACTION * nonzero:
        reasons.append(f"underflow: {underflow}/{nonzero} nonzero values flush to 0")
    if rel > LOSS_TOLERANCE:
        reasons.append(f"loss: {rel:.2g} of peak > {LOSS_TOLERANCE:g}")
    if not reasons:
        return None
    return OpRangeIssue(step.name, step.op_type, name, list(y32.shape), overflow, underflow, nonzero, rel, peak,
                        reasons)


class Fp16RangeObserver:
    """An executor observer (fp32 mode) that re-runs each op locally in fp16 and collects the issues;
    pass it to ``MILExecutor.run(observer=...)`` to get the report from a run made anyway."""

    def __init__(self) -> None:
        self.issues: list[OpRangeIssue] = []
        self.checked = 0

    def __call__(self, step: Step, kwargs: dict[str, Any], outs: list[Any]) -> None:
        floats = [i for i, o in enumerate(outs) if isinstance(o, np.ndarray) and o.dtype.kind == "f"]
        if not floats:
            return
        with np.errstate(all="ignore"):
            local = OPS[step.op_type](**{k: _round_inputs(v) for k, v in kwargs.items()})
            local = list(local) if isinstance(local, tuple) else [local]
            for i in floats:
                self.checked += 1
                issue = _judge(step, step.outputs[i], outs[i], round_fp16(_normalise(local[i])))
                if issue:
                    self.issues.append(issue)

    def report(self) -> dict[str, Any]:
        return {
            "ops_checked": self.checked,
            "rules": {"loss_tolerance": LOSS_TOLERANCE, "underflow_fraction": UNDERFLOW_FRACTION,
                      "method": "each op run on its fp32 inputs rounded to fp16, output rounded to fp16"},
            "issues": [i.to_dict() for i in self.issues],
        }


def fp16_range_report(program: MILProgram, inputs: list[np.ndarray]) -> dict[str, Any]:
    """Run ``program`` on ``inputs`` and list the ops that overflow, underflow or lose precision in fp16."""
    observer = Fp16RangeObserver()
    with np.errstate(all="ignore"):
        MILExecutor(program, "fp32").run(inputs, observer=observer)
    return observer.report()
