"""Op-substitution passes: the registry, the per-target pipelines, and the runner.

Pass modules in this package are discovered automatically; each registers its classes with
:func:`register_pass`. The pipeline of a target/accelerator pair is every pass whose ``wanted_by``
names it, in ``order``; the accelerators themselves are rows of the targets table
(:data:`edgevit.export.targets.TARGETS`).
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from edgevit.errors import EdgevitError
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


def register_pass(cls: type[GraphPass]) -> type[GraphPass]:
    """Class decorator: add a pass to the registry (its name must be unique and documented)."""
    if not cls.name or not (cls.__doc__ or "").strip():
        raise TypeError(f"pass {cls.__name__} needs a name and a docstring")
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise TypeError(f"pass name '{cls.name}' registered twice")
    PASSES[cls.name] = cls
    return cls


def _discover() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")


def get_pass(name: str) -> type[GraphPass]:
    if name not in PASSES:
        close = difflib.get_close_matches(name, PASSES, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; see `edgevit passes` ({len(PASSES)} passes)"
        raise EdgevitError(f"unknown pass '{name}'{hint}")
    return PASSES[name]


def wants(cls: type[GraphPass], target: str, accelerator: str) -> bool:
    """True when the pass's ``wanted_by`` patterns cover ``target:accelerator``."""
    key = f"{target}:{accelerator}"
    for pattern in cls.wanted_by:
        pattern = pattern if ":" in pattern or pattern == "*" else f"{pattern}:*"
        if fnmatch.fnmatchcase(key, pattern if pattern != "*" else "*:*"):
            return True
    return False


def default_pipeline(target: str, accelerator: str) -> tuple[str, ...]:
    """The passes ``--passes auto`` runs for ``target`` on ``accelerator``, in order."""
    chosen = [cls for cls in PASSES.values() if wants(cls, target, accelerator)]
    return tuple(cls.name for cls in sorted(chosen, key=lambda c: (c.order, c.name)))


def resolve_passes(spec: str | Sequence[str] | None, target: str, accelerator: str) -> tuple[str, ...]:
    """``auto`` (default pipeline), ``none``, or a comma-separated list of pass names, validated."""
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
    return tuple(sorted(dict.fromkeys(names), key=lambda n: (PASSES[n].order, n)))


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

    @property
    def program(self) -> torch.export.ExportedProgram:
        if self.captured is None:
            from edgevit.export.capture import capture

            self.captured = capture(self.model, self.example_inputs)
        return self.captured

    def to_dict(self) -> dict[str, Any]:
        return {"applied": [r.to_dict() for r in self.reports], "graph_max_abs_change": self.max_abs_change}


def run_pipeline(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    names: Sequence[str],
    check_inputs: Sequence[tuple[torch.Tensor, ...]] = (),
) -> PipelineResult:
    """Apply ``names`` to ``model``: module passes first, then capture, then graph passes.

    After every pass the rewritten graph runs on ``check_inputs`` and its largest output change
    against the original model is recorded, so the numerical cost of each pass is in the manifest.
    """
    from edgevit.export.capture import capture, flatten_outputs  # local: capture imports nothing of ours

    check_inputs = list(check_inputs) or [example_inputs]
    with torch.no_grad():
        refs = [[t.detach() for t in flatten_outputs(model(*x))] for x in check_inputs]

    def run(fn: Any, samples: int | None) -> list[list[torch.Tensor]]:
        with torch.no_grad():
            return [flatten_outputs(fn(*x)) for x in check_inputs[:samples]]

    def change(outs: list[list[torch.Tensor]]) -> float:
        """Largest |output - reference| over the check inputs ``outs`` were computed on."""
        return max(
            ((o.double() - r.double()).abs().max().item() if o.numel() else 0.0)
            for ro, oo in zip(refs, outs) for r, o in zip(ro, oo)
        )

    passes = [get_pass(n)() for n in names]
    module_passes = [p for p in passes if isinstance(p, ModulePass)]
    graph_passes = [p for p in passes if not isinstance(p, ModulePass)]
    reports: list[PassReport] = []
    work = model
    if module_passes:
        work = copy.deepcopy(model).eval()
        for p in module_passes:
            reports.append(PassReport(p.name, p.apply(work), p.exact))
            reports[-1].max_abs_change = change(run(work, 1))
    program = capture(work, example_inputs)
    if not graph_passes:
        outs = run(work, None) if module_passes else refs
        return PipelineResult(work, example_inputs, reports, change(outs), refs, outs, program)

    gm = program.module()
    annotate(gm, example_inputs)
    for p in graph_passes:
        ctx = PassContext(gm, example_inputs)
        try:
            sites = p.run(ctx)
        except EdgevitError:
            raise
        except Exception as exc:  # a pass bug must name the pass, not surface as a converter error
            raise EdgevitError(f"pass '{p.name}' failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
        if sites:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
            annotate(gm, example_inputs)
        # Per-pass cost on the first check input; the total below uses all of them.
        reports.append(PassReport(p.name, sites, p.exact, change(run(gm, 1)) if sites else None,
                                  notes=list(getattr(p, "notes", []))))
    if not any(r.sites for r in reports):
        return PipelineResult(gm, example_inputs, reports, 0.0, refs, refs, program)
    outs = run(gm, None)
    return PipelineResult(gm, example_inputs, reports, change(outs), refs, outs)


_discover()
