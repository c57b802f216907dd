"""Stride and size repairs shared by the rewrite passes (no passes here).

A rewrite that re-lays out a tensor (softmax of a transposed tensor, a pool as transpose-matmul-transpose)
can break a later ``aten.view`` that relied on the captured strides: ``repair_views`` and the
``ViewRepairing`` mixin mend those views. ``dynamic_dims`` tells a size that depends on the data
(``x[mask]``) from the example's number that ``annotate`` recorded. Storage groups and in-place writes
are :class:`edgevit.export.passes.base.Aliasing`.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import fx

from edgevit.export.passes.base import Aliasing, PassContext

aten = torch.ops.aten

def repair_views(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> int:
    """Turn each ``aten.view`` that can no longer view its (re-laid-out) input into ``aten.reshape``.

    A rewrite that computes a value in another layout (softmax of a transposed tensor, a pool as
    transpose-matmul-transpose) hands its readers a tensor with other strides than the captured graph
    did; every reader computes the same values except ``view``, which raises ("view size is not
    compatible with input tensor's size and stride"). The graph is run once on fake tensors (real
    strides, no arithmetic, buffers untouched); a ``view`` that raises there becomes a ``reshape``, which
    copies where the view cannot be taken. Not where an in-place op writes that storage (the copy would
    not see the write): that view is left, so the pipeline rolls the pass back rather than run a
    silently different graph. Returns the number of views changed.
    """
    if not any(n.target is aten.view.default for n in gm.graph.nodes):
        return 0
    from torch._subclasses.fake_tensor import FakeTensorMode

    writes = Aliasing(gm.graph)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fixed = 0

    class _Run(fx.Interpreter):
        def fetch_attr(self, target: str) -> Any:  # a fake copy: an in-place op must not write a buffer
            value = super().fetch_attr(target)
            return mode.from_tensor(value) if isinstance(value, torch.Tensor) else value

        def run_node(self, n: fx.Node) -> Any:
            nonlocal fixed
            try:
                return super().run_node(n)
            except Exception:
                if n.target is not aten.view.default or writes.written(n):
                    raise
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                value = aten.reshape.default(*args, **kwargs)  # raises again if strides were not the cause
                n.target = aten.reshape.default
                fixed += 1
                return value

    try:
        with mode, torch.no_grad():
            _Run(gm).run(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs))
    except Exception:  # noqa: BLE001 - what else fails is for the pipeline's own check to report
        pass
    if fixed:
        gm.recompile()
    return fixed


class ViewRepairing:
    """Mixin for passes that change the layout of the values they produce: after the pass rewrote
    something, the ``view`` nodes its new strides broke become ``reshape`` (:func:`repair_views`)."""

    def run(self, ctx: PassContext) -> int:
        sites = super().run(ctx)  # type: ignore[misc]
        if sites:
            ctx.graph.eliminate_dead_code()
            ctx.gm.recompile()
            repair_views(ctx.gm, ctx.example_inputs)
        return sites


# --- data-dependent sizes ------------------------------------------------------------------------

_DATA_DEPENDENT = (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output)


def _symbolic_values(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> dict[fx.Node, Any] | None:
    """Every node's value on fake tensors with a shape environment (as ``torch.export`` saw them):
    a size that depends on the data (``x[mask]``, ``nonzero``) is a symbol there, not the example's
    number that ``annotate`` records. None when no op of the graph can make such a size."""
    if not any(tag in getattr(n.target, "tags", ()) for n in gm.graph.nodes for tag in _DATA_DEPENDENT):
        return None
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    values: dict[fx.Node, Any] = {}

    class _Run(fx.Interpreter):
        def fetch_attr(self, target: str) -> Any:
            value = super().fetch_attr(target)
            return mode.from_tensor(value) if isinstance(value, torch.Tensor) else value

        def run_node(self, n: fx.Node) -> Any:
            values[n] = value = super().run_node(n)
            return value

    try:
        with mode, torch.no_grad():
            _Run(gm).run(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs))
    except Exception:  # noqa: BLE001 - nodes not reached count as unknown (dynamic) below
        pass
    return values


def dynamic_dims(ctx: PassContext, node: Any, dims: Iterable[int] | None = None) -> bool:
    """True when a size of ``node`` (of ``dims``, default all) depends on the data, or is unknown.

    ``annotate`` records the example's sizes, so a pass that bakes a size into a constant or a reshape
    (``sum`` -> ``mean`` x N, a reshape to (B, C, 1, 1)) would be right for that example only.
    """
    cached = getattr(ctx, "_edgevit_symbolic", None)
    if cached is None or cached[0] is not ctx.graph:
        cached = (ctx.graph, _symbolic_values(ctx.gm, ctx.example_inputs))
        ctx._edgevit_symbolic = cached  # type: ignore[attr-defined]
    values = cached[1]
    if values is None or not isinstance(node, fx.Node):
        return False
    value = values.get(node)
    if not isinstance(value, torch.Tensor):
        return node.op in ("call_function", "placeholder", "get_attr")  # not reached: unknown
    sizes = list(value.shape)
    picked = range(len(sizes)) if dims is None else [d % max(len(sizes), 1) for d in dims]
    return any(not isinstance(sizes[d], int) for d in picked if d < len(sizes))
