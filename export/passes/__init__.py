"""Op-substitution passes: the registry, the one order they run in, and the runner.

Pass modules in this package (and a backend's own ``export/backends/<name>/passes/``) are discovered
automatically; each registers its classes with :func:`register_pass`. Which passes run for a
target/accelerator pair is an explicit list in that backend's package (``BACKEND.pipelines``); every
such list, and any ``--passes a,b,c`` a user gives, runs in :data:`ORDER`.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import logging

import torch
from torch import nn

from edgevit.errors import EdgevitError
from edgevit.export import capture as _capture  # called through the module: tests count captures
from edgevit.export.capture import flatten_outputs
from edgevit.export.parity import TOLERANCES, Tolerance
from edgevit.export.passes.base import (
    GraphPass,
    ModulePass,
    PassContext,
    PassReport,
    annotate,
    is_op,
)

__all__ = [
    "GraphPass", "ModulePass", "PassContext", "PassReport", "PASSES", "register_pass", "get_pass",
    "default_pipeline", "resolve_passes", "run_pipeline", "PipelineResult", "annotate", "is_op",
]

PASSES: dict[str, type[GraphPass]] = {}
_log = logging.getLogger("edgevit.passes")


def register_pass(cls: type[GraphPass]) -> type[GraphPass]:
    """Class decorator: add a pass to the registry (its name must be unique and documented)."""
    if not cls.name or not (cls.__doc__ or "").strip():
        raise TypeError(f"pass {cls.__name__} needs a name and a docstring")
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise TypeError(f"pass name '{cls.name}' registered twice")
    PASSES[cls.name] = cls
    return cls


#: The order in which passes run, whichever pipeline holds them. Why each sits where it does:
ORDER: tuple[str, ...] = (
    "strip_aliases",  # first: every later pattern matches without alias/clone/dropout nodes in the way
    "select_to_slice",  # x[:, 0] as slice + squeeze, before constant folding and layout passes read it
    "fold_constant_gathers",  # weight-only subgraphs become constants that later passes can read
    "fold_batchnorm",  # into the conv/linear before it: needs constant weights, before layout changes
    "fuse_gelu",  # a written-out GELU as one op, before anything decomposes elementwise math
    "adaptive_pool_static",  # shape-dependent pools become static ops while shapes are still the model's
    "upsample_static",  # likewise for nearest up-sampling
    "nearest_downsample_slice",  # likewise for nearest down-sampling
    "unfold_fold_static",  # im2col/col2im before the rank lowering sees their rank-5/6 intermediates
    "pixel_unshuffle_rank4",  # a rank-6 permute made rank <= 4 before lower_rank's general rewrite
    "lower_rank",  # every remaining rank > 4 chain, once the special cases above are done
    "sdpa_to_explicit",  # attention as matmul/softmax/matmul, so mask, softmax and layout passes see it
    "einsum_to_matmul",  # einsums as matmuls, for the same reason
    "expand_to_broadcast",  # after the decompositions that produce expands
    "finite_masks",  # on the explicit attention's mask (after sdpa_to_explicit)
    "softmax_last_axis",  # on the explicit attention's softmax, and any other
    "softmax_drop_unit_dims",  # then its inner unit dims reshaped away (TFLite's layout pass moves the axis)
    "gelu_tanh",  # NNAPI-only decompositions of normalisation and activation ops
    "decompose_group_norm",
    "decompose_layer_norm",
    "decompose_vector_norm",
    "sum_to_mean",
    "sqrt_div_to_rsqrt",  # TFLite NNAPI: the decomposed norms' Sqrt + Div as one Rsqrt and a Mul
    "static_gather_scatter",  # constant-index gathers/scatters as slices or one-hot matmuls
    "static_topk_select",
    "ane_channel_layer_norm",  # the Neural Engine layout (B, C, 1, S): norms, then linears, then attention,
    "ane_linear_to_conv",  # then the transposes between them cancelled; after every generic rewrite so
    "ane_split_heads",  # that they see the final op set
    "ane_cancel_transposes",
    "split_fused_projection",  # on the final graph: column ranges of a fused qkv Linear as separate Linears
    "split_fused_conv_projection",  # likewise for a fused 1x1-conv projection split along channels
    "fold_scale_into_linear",  # after the split: the attention scale folded into the q columns
    "sink_slices",  # last: moves slices above row-wise ops of the final graph
)


def _discover() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")
    from edgevit.export.backends import BACKENDS  # a backend's own passes: export/backends/<name>/passes/

    for backend in BACKENDS.values():
        try:
            package = importlib.import_module(f"edgevit.export.backends.{backend.name}.passes")
        except ModuleNotFoundError as exc:
            if exc.name != f"edgevit.export.backends.{backend.name}.passes":
                raise
            continue
        for mod in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{mod.name}")


def get_pass(name: str) -> type[GraphPass]:
    if name not in PASSES:
        close = difflib.get_close_matches(name, PASSES, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; see `edgevit passes` ({len(PASSES)} passes)"
        raise EdgevitError(f"unknown pass '{name}'{hint}")
    return PASSES[name]


def default_pipeline(target: str, accelerator: str) -> tuple[str, ...]:
    """The passes ``--passes auto`` runs for ``target`` on ``accelerator``, in order (the backend's list)."""
    from edgevit.export.backends import get_backend

    return tuple(get_backend(target).pipelines[accelerator])


def _rank(name: str) -> tuple[int, int]:
    """A pass's place in :data:`ORDER`; a pass outside it (registered by a test) runs after, by name."""
    return (ORDER.index(name), 0) if name in ORDER else (len(ORDER), 0)


def resolve_passes(spec: str | Sequence[str] | None, target: str, accelerator: str) -> tuple[str, ...]:
    """``auto`` (default pipeline), ``none``, or a comma-separated list of pass names, validated, in ORDER."""
    if spec is None or spec == "auto":
        return default_pipeline(target, accelerator)
    if spec == "none":
        return ()
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if not names:
        raise EdgevitError("--passes needs 'auto', 'none' or a comma-separated list of pass names")
    for n in names:
        get_pass(n)
    return tuple(sorted(dict.fromkeys(names), key=_rank))


@dataclass
class PipelineResult:
    """The rewritten model, its captured program, and what each pass did.

    ``program`` is captured on first use when graph passes rewrote the graph: a converter that exports
    ``model`` itself (litert-torch) never pays for that capture.
    """

    model: nn.Module  # the rewritten model (a GraphModule once a graph pass ran)
    example_inputs: tuple[torch.Tensor, ...]
    reports: list[PassReport] = field(default_factory=list)
    max_abs_change: float = 0.0  # rewritten graph vs the original model, in PyTorch
    references: list[list[torch.Tensor]] = field(default_factory=list)  # the model's outputs per check input
    outputs: list[list[torch.Tensor]] = field(default_factory=list)  # the rewritten graph's, same inputs
    captured: torch.export.ExportedProgram | None = None  # ``model``'s capture, once made
    #: re-runs the pipeline with a capture check after every pass (set by a non-strict run_pipeline)
    replay: Callable[[], PipelineResult] | None = field(default=None, repr=False)

    @property
    def program(self) -> torch.export.ExportedProgram:
        """The rewritten graph captured by ``torch.export``. If it cannot be captured again, the pipeline
        is replayed with a capture check after every pass, so only the pass responsible is rolled back."""
        if self.captured is None:
            try:
                self.captured = _capture.capture(self.model, self.example_inputs)
            except EdgevitError as exc:
                if self.replay is None:
                    raise
                _log.warning("the rewritten graph could not be captured (%s); replaying the passes", exc)
                self._adopt(self.replay())
        return self.captured

    def _adopt(self, other: PipelineResult) -> None:
        self.model, self.reports, self.max_abs_change = other.model, other.reports, other.max_abs_change
        self.outputs, self.replay = other.outputs, None
        self.captured = other.captured or _capture.capture(other.model, other.example_inputs)


def run_pipeline(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    names: Sequence[str],
    check_inputs: Sequence[tuple[torch.Tensor, ...]] = (),
    *,
    strict: bool = False,
) -> PipelineResult:
    """Apply ``names`` to ``model``: module passes first, then capture, then graph passes.

    After every pass that rewrote something, the rewritten graph runs on the first of ``check_inputs``
    and its largest output change against the original model is recorded, so the numerical cost of each
    pass is in the manifest. A pass never makes a model worse: when it raises, leaves a graph that does
    not run, or moves an output beyond its bound (:func:`pass_bound`), it is rolled back (its report says
    ``status="rolled back"`` and why, and a warning is logged) and the pipeline goes on with the others.
    ``strict`` raises an :class:`EdgevitError` instead (edgevit's own tests and CI). If the rewritten
    graph cannot be captured again by ``torch.export``, the pipeline is replayed with a capture check
    after every pass, so that the pass responsible is the one rolled back.
    """
    check_inputs = list(check_inputs) or [example_inputs]
    with torch.no_grad():
        refs = [[t.detach() for t in flatten_outputs(model(*x))] for x in check_inputs]
    runner = _PipelineRun(model, example_inputs, check_inputs, refs, strict)
    result = runner.run(names, capture_each=False)
    if not strict:
        result.replay = lambda: runner.run(names, capture_each=True)
    return result


def pass_bound(exact: bool) -> Tolerance:
    """How far one pass may move the model's outputs before it is rolled back: fp32 rounding for an exact
    pass (the fp32 parity bound), the fp16 parity bound for an approximation (``gelu_tanh`` moves each
    activation by at most 4.7e-4, far below it; a wrong rewrite moves outputs by far more)."""
    return TOLERANCES["fp32" if exact else "fp16"]


class _PipelineRun:
    """One application of a pipeline, pass by pass, with the checks that decide a rollback."""

    def __init__(self, model: nn.Module, example_inputs: tuple[torch.Tensor, ...],
                 check_inputs: list[tuple[torch.Tensor, ...]], refs: list[list[torch.Tensor]], strict: bool):
        self.model, self.example_inputs, self.check_inputs = model, example_inputs, check_inputs
        self.refs, self.strict = refs, strict

    def outputs(self, fn: Any, samples: int | None) -> list[list[torch.Tensor]]:
        with torch.no_grad():
            return [flatten_outputs(fn(*x)) for x in self.check_inputs[:samples]]

    def change(self, outs: list[list[torch.Tensor]]) -> float:
        """Largest |output - reference| over the check inputs ``outs`` were computed on."""
        return max(
            ((o.double() - r.double()).abs().max().item() if o.numel() else 0.0)
            for ro, oo in zip(self.refs, outs) for r, o in zip(ro, oo)
        )

    def beyond_bound(self, outs: list[list[torch.Tensor]], exact: bool) -> str | None:
        """Why ``outs`` (on the first check input) are not within one pass's bound of the outputs before
        that pass, or None. Each pass answers for its own change: an exact pass after an approximation
        (``decompose_layer_norm`` after ``gelu_tanh`` on NNAPI) is held to fp32 rounding of the
        approximated graph, not of the model."""
        bound = pass_bound(exact).max_abs_rel_to_peak
        before = self.current
        if len(outs[0]) != len(before):
            return f"{len(outs[0])} outputs instead of {len(before)}"
        for i, (r, o) in enumerate(zip(before, outs[0])):
            if r.shape != o.shape or r.dtype != o.dtype:
                return f"output {i} became {tuple(o.shape)} {o.dtype}, was {tuple(r.shape)} {r.dtype}"
            if not r.is_floating_point():
                if not torch.equal(r, o):
                    return f"integer output {i} changed"
                continue
            why = _moved(i, r.double(), o.double(), bound)
            if why:
                return why
        return None

    def run(self, names: Sequence[str], capture_each: bool) -> PipelineResult:
        self.current = self.refs[0]  # outputs on the first check input before the next pass
        passes = [get_pass(n)() for n in names]
        module_passes = [p for p in passes if isinstance(p, ModulePass)]
        graph_passes = [p for p in passes if not isinstance(p, ModulePass)]
        reports: list[PassReport] = []
        work = self.model
        if module_passes:
            work = copy.deepcopy(self.model).eval()
            for p in module_passes:
                work = self._module_pass(p, work, reports)
        program = _capture.capture(work, self.example_inputs)
        if not graph_passes:
            outs = self.outputs(work, None) if module_passes else self.refs
            return PipelineResult(work, self.example_inputs, reports, self.change(outs), self.refs, outs, program)
        gm = program.module()
        annotate(gm, self.example_inputs)
        for p in graph_passes:
            reports.append(self._graph_pass(p, gm, capture_each))
        if not any(r.sites for r in reports):
            return PipelineResult(gm, self.example_inputs, reports, 0.0, self.refs, self.refs, program)
        outs = self.outputs(gm, None)
        return PipelineResult(gm, self.example_inputs, reports, self.change(outs), self.refs, outs)

    def _module_pass(self, p: ModulePass, work: nn.Module, reports: list[PassReport]) -> nn.Module:
        saved = copy.deepcopy(work)
        try:
            sites = p.apply(work)
            outs = self.outputs(work, 1) if sites else None
            why = self.beyond_bound(outs, p.exact) if sites else None
        except Exception as exc:  # any failure of a pass is the pass's, never the model's
            sites, outs, why = 0, None, f"{type(exc).__name__}: {_first_line(exc)}"
        report = PassReport(p.name, sites, p.exact, self.change(outs) if outs and why is None else None)
        reports.append(report)
        if why is None:
            self.current = outs[0] if outs else self.current
            return work
        self._roll_back(report, why)
        return saved

    def _graph_pass(self, p: GraphPass, gm: torch.fx.GraphModule, capture_each: bool) -> PassReport:
        saved = _GraphSnapshot(gm)
        report = PassReport(p.name, 0, p.exact)
        try:
            report.sites = p.run(PassContext(gm, self.example_inputs))
            report.notes = list(getattr(p, "notes", []))
            why = self._check_rewrite(gm, report, capture_each) if report.sites else None
        except Exception as exc:  # a pass bug must name the pass, and must not cost the model its export
            why = f"{type(exc).__name__}: {_first_line(exc)}"
        if why is not None:
            saved.restore(gm)
            self._roll_back(report, why)
        return report

    def _check_rewrite(self, gm: torch.fx.GraphModule, report: PassReport, capture_each: bool) -> str | None:
        """Why the rewritten ``gm`` must be rolled back, or None (and the pass's change is then recorded)."""
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        try:
            annotate(gm, self.example_inputs)
            outs = self.outputs(gm, 1)
        except Exception as exc:
            return f"the rewritten graph does not run: {type(exc).__name__}: {_first_line(exc)}"
        why = self.beyond_bound(outs, report.exact)
        if why is None and capture_each:
            try:
                _capture.capture(gm, self.example_inputs)
            except EdgevitError as exc:
                why = f"the rewritten graph cannot be captured: {exc}"
        if why is None:
            report.max_abs_change = self.change(outs)  # cumulative, against the model (the manifest's figure)
            self.current = outs[0]
        return why

    def _roll_back(self, report: PassReport, why: str) -> None:
        if self.strict:
            raise EdgevitError(f"pass '{report.name}' failed: {why}")
        _log.warning("pass '%s' rolled back: %s", report.name, why)
        report.roll_back(why)


class _GraphSnapshot:
    """The graph and attribute names of a GraphModule before a pass, to restore if the pass is rolled back.

    Passes never modify existing tensors in place (they add constants), so the graph and the list of
    attributes are all a rollback needs; no copy of the weights is made.
    """

    def __init__(self, gm: torch.fx.GraphModule):
        self.graph = torch.fx.Graph(owning_module=gm)
        out = self.graph.graph_copy(gm.graph, {})
        self.graph.output(out)
        self.graph._codegen = copy.deepcopy(gm.graph._codegen)  # the pytree of inputs and outputs
        self.attrs = set(gm._buffers) | set(gm._parameters) | set(gm._modules) | set(gm.__dict__)

    def restore(self, gm: torch.fx.GraphModule) -> None:
        for name in [n for n in gm._buffers if n not in self.attrs]:
            del gm._buffers[name]
        gm.graph = self.graph
        gm.recompile()


def _moved(i: int, before: torch.Tensor, after: torch.Tensor, bound: float) -> str | None:
    """Why output ``i`` moved beyond ``bound`` of its finite peak, or None. Positions that were not finite
    before (a fully masked softmax row is NaN in PyTorch) are the model's own; a pass may give them a
    value (``finite_masks`` does, on purpose) but must not make a finite value non-finite."""
    finite = torch.isfinite(before)
    if not torch.isfinite(after[finite]).all():
        return f"output {i} became inf/NaN where it was finite"
    if not finite.any():
        return None
    peak = before[finite].abs().max().item()
    err = (after[finite] - before[finite]).abs().max().item()
    if err > bound * peak and err > torch.finfo(torch.float32).tiny:
        return f"output {i} moved by {err:.3g} (peak {peak:.3g}, bound {bound:g} of the peak)"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


_discover()
