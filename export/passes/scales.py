"""Scale folding: a constant multiply of a Linear's output columns moves into its weights."""

from __future__ import annotations

import operator

import torch
from torch import fx

from edgevit.export.passes import register_pass
from edgevit.export.passes.base import (
    GraphPass,
    PassContext,
    aten,
    is_op,
    column_readers,
    linear_constants,
    slice_columns,
    split_columns,
)

# Ops through which a scalar multiply commutes (they move or multiply elements, never mix them).
_VIEWS = (aten.reshape, aten.view, aten._unsafe_view, aten.transpose, aten.permute, aten.unsqueeze,
          aten.squeeze, aten.flatten)
_MATMULS = (aten.matmul, aten.bmm)  # (a·c) @ b = (a @ b)·c: follow the left operand


def _scalar_operand(node: fx.Node) -> tuple[fx.Node, float] | None:
    """(tensor, scale) for ``mul(tensor, scalar)`` / ``mul(scalar, tensor)``, else None."""
    if not is_op(node, aten.mul) or len(node.args) != 2:
        return None
    a, b = node.args
    if isinstance(a, fx.Node) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return a, float(b)
    if isinstance(b, fx.Node) and isinstance(a, (int, float)) and not isinstance(a, bool):
        return b, float(a)
    return None


def _columns(ctx: PassContext, node: fx.Node) -> tuple[fx.Node, int, int] | None:
    """The Linear whose output columns [start, end) ``node``'s elements all are (moved, not mixed)."""
    while True:
        if len(node.users) != 1:
            return None  # another reader would see the scaled values
        if is_op(node, *_VIEWS, *_MATMULS):
            node = node.args[0]
            continue
        if node.target is operator.getitem:
            found = split_columns(ctx, node)
        elif is_op(node, aten.slice):
            found = slice_columns(ctx, node)
        elif is_op(node, aten.linear):
            return node, 0, ctx.shape(node)[-1]
        else:
            return None
        if found is None or not is_op(found[0], aten.linear) or column_readers(ctx, found[0]) is None:
            return None
        return found


@register_pass
class FoldScaleIntoLinear(GraphPass):
    """``linear(x, W, b)[..., cols] (viewed, transposed, matmul'd) * c`` → same with W[cols], b[cols] * c.

    What: a scalar multiply whose input is, through single-reader reshapes, transposes and the left
    operand of matmuls, a column range of one Linear's output (the whole output, a slice, or one chunk of
    a last-dim split) is removed and those rows of the Linear's weight and bias are scaled instead. The
    attention scale ``q * head_dim**-0.5`` (or ``(q @ kᵀ) * scale``) of a fused-qkv block is the case
    that matters: the q columns of ``qkv`` absorb it.
    Why: every backend otherwise runs one full-size multiply per attention layer (DeiT-Tiny: 12 MULs of
    3 x 197 x 64) that the weights can carry for free.
    Exact when the scale is a power of two (head_dim 64: 1/8); otherwise one rounding per weight
    (≤ 2⁻²⁴ relative).
    """

    name = "fold_scale_into_linear"

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        found = _scalar_operand(node)
        return found is not None and ctx.shape(found[0]) is not None and ctx.val(found[0]).dtype.is_floating_point

    def rewrite(self, ctx: PassContext, node: fx.Node) -> bool:
        tensor, scale = _scalar_operand(node)
        found = _columns(ctx, tensor)
        if found is None:
            return False
        linear, start, end = found
        weight, bias = linear_constants(ctx, linear)
        if weight is None:
            return False
        with ctx.graph.inserting_before(linear):
            new_weight = ctx.add_constant(_scaled_rows(weight, start, end, scale), "scaled_weight")
            new_bias = None if bias is None else ctx.add_constant(_scaled_rows(bias, start, end, scale), "scaled_bias")
        linear.args = (linear.args[0], new_weight, new_bias)
        ctx.replace(node, tensor)
        ctx.graph.erase_node(node)
        return True


def _scaled_rows(value: torch.Tensor, start: int, end: int, scale: float) -> torch.Tensor:
    out = value.detach().clone()
    out[start:end] *= scale
    return out
