"""Passes on quantized artifacts: rewrites of the graph a backend's quantizer wrote, so that an accelerator
takes it whole.

The op-substitution passes (:mod:`edgevit.export.passes`) rewrite the PyTorch graph before conversion;
what an integer accelerator refuses in a *quantized* graph (an int8 activation where it wants uint8, a
per-channel scale where it wants one, an op it has no integer kernel for sitting between a dequantize and
a quantize) only exists after the backend's quantizer ran. These passes rewrite that artifact.

They live with the backend that owns the format, in ``export/backends/<name>/qdq_passes.py``, each a
registered :class:`ArtifactPass` with a name, a docstring showing the pattern before and after, the
problem keys of the coverage checkers it removes (``fixes``, as for the other passes), and
``PIPELINES``: accelerator -> the passes its int8 artifacts get, in order. The backend's ``quantize``
calls :func:`apply_pipeline` after its tool; the manifest's ``quantization.passes`` records each pass
(name, sites, status, the change it made).

**A rewrite never makes a working model fail.** After each pass the artifact is loaded and run on
calibration samples by the backend's ``Executor`` next to the fp32 model: a pass that raises, whose output
does not load or run, or that moves the outputs away from the fp32 model by more than the arithmetic of
int8 allows is rolled back, and the others go on. The allowance is the noise ``n`` re-rounded int8
quantizers may add, ``n`` the pass's sites (:func:`~edgevit.export.quantization.gate.required_sqnr_db`
for ``int8``, in power on top of the artifact's own error): a pass that drops quantizers moves towards
fp32 and always passes; one that re-rounds (a coarser fixed scale, per-tensor weights) may add at most
that. Exact passes (the same real numbers in another encoding) are held to the same bound at run time;
their tests hold them to identical outputs.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Generic, Protocol, Sequence, TypeVar

import numpy as np

from edgevit.errors import EdgevitError

M = TypeVar("M")


class ArtifactPass(Generic[M]):
    """Base class of the quantized-artifact passes. Subclasses set the class attributes and ``run``."""

    name: ClassVar[str] = ""
    backend: ClassVar[str] = ""  # the target whose artifacts it rewrites
    #: True when the rewrite keeps every real number the graph computes (a re-encoding); False when it
    #: re-rounds or drops quantizers (then bounded by the arithmetic of int8, see the module doc)
    exact: ClassVar[bool] = True
    #: problem keys / op types of the coverage checkers this pass removes (``edgevit inspect`` names it)
    fixes: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str] = "quantized"

    def run(self, model: M) -> int:
        """Rewrite ``model`` in place; the number of sites rewritten."""
        raise NotImplementedError

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


QUANTIZED_PASSES: dict[str, type[ArtifactPass]] = {}


def register_quantized_pass(cls: type[ArtifactPass]) -> type[ArtifactPass]:
    """Class decorator: add a quantized-artifact pass to the registry (unique name, a docstring, a backend)."""
    if not cls.name or not cls.backend or not (cls.__doc__ or "").strip():
        raise TypeError(f"quantized pass {cls.__name__} needs a name, a backend and a docstring")
    if cls.name in QUANTIZED_PASSES and QUANTIZED_PASSES[cls.name] is not cls:
        raise TypeError(f"quantized pass name '{cls.name}' registered twice")
    QUANTIZED_PASSES[cls.name] = cls
    return cls


def _module(target: str) -> Any:
    """The backend's ``qdq_passes`` module, or None when it has none."""
    name = f"edgevit.export.backends.{target}.qdq_passes"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return None


def _discover() -> None:
    from edgevit.export.backends import BACKENDS

    for target in BACKENDS:
        _module(target)


def quantized_pipeline(target: str, accelerator: str | None, precision: str = "int8") -> tuple[str, ...]:
    """The passes an artifact of ``precision`` for ``target``/``accelerator`` gets after quantization."""
    module = _module(target)
    if module is None or accelerator is None or precision != "int8":
        return ()
    return tuple(getattr(module, "PIPELINES", {}).get(accelerator, ()))


def listing_rows() -> list[dict[str, Any]]:
    """The quantized passes as ``edgevit passes --json`` rows (the fields it shows for the other passes;
    ``pipelines`` names the ``target:accelerator`` pairs whose int8 artifacts get each)."""
    from edgevit.export.targets import TARGETS

    _discover()
    pairs = [(t.name, a.name) for t in TARGETS.values() for a in t.accelerators]
    return [{"name": name, "order": None, "kind": f"{cls.kind} ({cls.backend})", "exact": cls.exact,
             "summary": cls.summary(), "fixes": list(cls.fixes),
             "pipelines": [f"{t}:{a}" for t, a in pairs if name in quantized_pipeline(t, a)]}
            for name, cls in QUANTIZED_PASSES.items()]


def fixing_passes(key: str) -> list[str]:
    """Names of the quantized passes whose ``fixes`` list ``key`` (case-insensitive)."""
    _discover()
    return [name for name, cls in QUANTIZED_PASSES.items() if any(f.lower() == key for f in cls.fixes)]


# --- the runner -----------------------------------------------------------------------------------------------


class Executor(Protocol[M]):
    """What the runner needs from a backend: copy a model, run it (raising if it does not load or run), and the
    fp32 model's outputs on the same samples (what every quantized artifact is an approximation of)."""

    def copy(self, model: M) -> M: ...

    def outputs(self, model: M) -> list[np.ndarray]: ...

    def reference(self) -> list[np.ndarray]: ...


@dataclass
class QuantizedPassReport:
    """What one quantized pass did: sites, status, and the artifact's SQNR against fp32 before and after it."""

    name: str
    sites: int
    exact: bool
    status: str = "not applicable"  # applied | not applicable | rolled back | not run
    sqnr_before_db: float | None = None  # the artifact against the fp32 model, worst output
    sqnr_after_db: float | None = None
    allowed_db: float | None = None  # the noise its sites may add, as an SQNR (int8 arithmetic)
    reason: str | None = None
    numeric: bool = False  # rolled back for its accuracy (not because it raised or broke the artifact)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QuantizedPipelineResult(Generic[M]):
    model: M
    reports: list[QuantizedPassReport] = field(default_factory=list)

    @property
    def applied(self) -> list[QuantizedPassReport]:
        return [r for r in self.reports if r.status == "applied"]

    def record(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.reports]

    def notes(self, accelerator: str | None) -> list[str]:
        """What the manifest's notes say of the pipeline: the passes applied, and why others were not."""
        done = ", ".join(f"{r.name} ({r.sites} sites)" for r in self.applied) or "none applied"
        return [f"{accelerator} passes on the quantized artifact: {done}"] + [
            f"quantized pass {r.name} {r.status}: {r.reason}" for r in self.reports if r.reason]


def int8_bound_db(sites: int) -> float:
    """The noise ``sites`` re-rounded int8 quantizers may add, as an SQNR (one weight and one activation
    quantizer per site: the quantization gate's own bound, :mod:`edgevit.export.quantization.gate`)."""
    from edgevit.export.quantization.gate import required_sqnr_db

    return required_sqnr_db("int8", sites)


def output_powers(reference: Sequence[np.ndarray], outs: Sequence[np.ndarray]) -> list[tuple[float, float]]:
    """Per output: (signal power of the reference, error power of ``outs``); inf error for a wrong shape or a
    non-finite value."""
    if len(reference) != len(outs):
        return [(1.0, math.inf)]
    powers = []
    for ref, out in zip(reference, outs):
        ref64 = ref.astype(np.float64)
        if ref.shape != out.shape or not np.isfinite(out).all():
            powers.append((float(np.mean(ref64**2)), math.inf))
            continue
        powers.append((float(np.mean(ref64**2)), float(np.mean((out.astype(np.float64) - ref64) ** 2))))
    return powers


def worst_sqnr_db(powers: list[tuple[float, float]]) -> float:
    """The lowest SQNR (dB) of :func:`output_powers`' (signal, error) pairs."""
    return min((math.inf if noise == 0 else (10 * math.log10(signal / noise) if 0 < signal and noise < math.inf
                                             else -math.inf))
               for signal, noise in powers)


def within_int8_arithmetic(reference: Sequence[np.ndarray], before: Sequence[np.ndarray],
                           after: Sequence[np.ndarray], sites: int) -> bool:
    """Whether ``after`` is no farther from the fp32 ``reference`` than ``before`` plus the noise ``sites`` int8
    quantizers may add (per output, in power). A rewrite that removes quantizers moves the outputs *towards*
    fp32 and always passes; one that re-rounds them may add at most that noise."""
    allowed = 10 ** (-int8_bound_db(sites) / 10)
    old, new = output_powers(reference, before), output_powers(reference, after)
    return len(old) == len(new) and all(n <= o + allowed * s for (s, o), (_, n) in zip(old, new))


def run_quantized_passes(names: Sequence[str], model: M, executor: Executor[M],
                         strict: bool | None = None) -> QuantizedPipelineResult[M]:
    """Apply the registered passes ``names`` in order; each is kept only if its output loads, runs and stays
    within the arithmetic of int8 (:func:`within_int8_arithmetic`). ``strict``: raise when a pass raises or
    breaks the artifact, instead of rolling it back (default: the environment's ``EDGEVIT_STRICT_PASSES=1``, as
    edgevit's own tests set it); a pass rolled back for its accuracy is a decision, never an error (some passes
    are the fallback of others: ``nnapi_float_softmax`` after ``softmax_output_scale``)."""
    from edgevit.export.options import STRICT_PASSES_ENV

    strict = os.environ.get(STRICT_PASSES_ENV) == "1" if strict is None else strict
    _discover()
    result = QuantizedPipelineResult(model)
    classes = [QUANTIZED_PASSES.get(name) or _unknown(name) for name in names]
    reference = executor.reference()
    try:
        before = executor.outputs(model)
    except Exception as exc:  # nothing to hold a rewrite to: leave the tool's artifact as it is
        why = f"the quantizer's own artifact does not run here ({_first_line(exc)})"
        result.reports = [QuantizedPassReport(cls.name, 0, cls.exact, "not run", reason=why) for cls in classes]
        return result
    for cls in classes:
        report, candidate, outs = _try_pass(cls, result.model, executor, reference, before)
        result.reports.append(report)
        if report.status == "rolled back" and strict and not report.numeric:  # a bug, not an accuracy decision
            raise EdgevitError(f"quantized pass '{cls.name}' failed: {report.reason}")
        if report.status == "applied":
            result.model, before = candidate, outs
    return result


def _unknown(name: str) -> type[ArtifactPass]:
    raise EdgevitError(f"unknown quantized pass '{name}'")


def _try_pass(cls: type[ArtifactPass], model: M, executor: Executor[M], reference: list[np.ndarray],
              before: list[np.ndarray]) -> tuple[QuantizedPassReport, M, list[np.ndarray]]:
    report = QuantizedPassReport(cls.name, 0, cls.exact)
    try:
        candidate = executor.copy(model)
        report.sites = cls().run(candidate)
    except Exception as exc:  # a pass bug names the pass and must not cost the model its export
        return _rolled_back(report, f"{type(exc).__name__}: {_first_line(exc)}"), model, before
    if not report.sites:
        return report, model, before
    try:
        outs = executor.outputs(candidate)
    except Exception as exc:
        return _rolled_back(report, f"the rewritten artifact does not load or run: {_first_line(exc)}"), model, before
    report.sqnr_before_db = worst_sqnr_db(output_powers(reference, before))
    report.sqnr_after_db = worst_sqnr_db(output_powers(reference, outs))
    report.allowed_db = int8_bound_db(report.sites)
    if not within_int8_arithmetic(reference, before, outs, report.sites):
        why = (f"it moved the outputs away from fp32 beyond int8 arithmetic: SQNR {report.sqnr_before_db:.1f} -> "
               f"{report.sqnr_after_db:.1f} dB (its {report.sites} sites may add noise at {report.allowed_db:.1f} dB)")
        report.numeric = True
        return _rolled_back(report, why), model, before
    report.status = "applied"
    return report, candidate, outs


def _rolled_back(report: QuantizedPassReport, why: str) -> QuantizedPassReport:
    report.reason = f"{why} ({report.sites} site(s) undone)" if report.sites else why
    report.status, report.sites = "rolled back", 0
    return report


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def apply_pipeline(target: str, accelerator: str | None, precision: str, model: M, executor: Executor[M],
                   strict: bool | None = None) -> QuantizedPipelineResult[M]:
    """The ``target``/``accelerator`` pipeline (:func:`quantized_pipeline`) on a freshly quantized ``model``."""
    return run_quantized_passes(quantized_pipeline(target, accelerator, precision), model, executor, strict)
