"""``ane_channel_layer_norm``: LayerNorm over the channels of (B, S, C) as a norm over dim 1 of (B, C, 1, S).

Apple's ``LayerNormANE`` (ml-ane-transformers), converted only next to BC1S ops so
that it removes layout changes instead of adding them; see the package docstring for the whole ANE layout.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from edgevit.export.backends.coreml.passes._layout import (
    _convertible_linear,
    _flippable,
    _from_bc1s,
    _from_source,
    _is_float,
    _PruningPass,
    _tensor_args,
    _to_bc1s,
    _to_chain_end,
)
from edgevit.export.passes import register_pass
from edgevit.export.passes.base import PassContext, aten, is_op
from edgevit.export.passes.repairs import ViewRepairing


@register_pass
class AneChannelLayerNorm(ViewRepairing, _PruningPass):
    """``layer_norm(x, [C])`` on (B, S, C) next to BC1S ops → normalisation over dim 1 of (B, C, 1, S).

    Why: once the linears are 1x1 convs on (B, C, 1, S) (``ane_linear_to_conv``), a LayerNorm over the
    last dim of (B, S, C) forces a layout change back and forth around every norm; Apple's
    ``LayerNormANE`` normalises over dim 1 of the BC1S tensor instead.
    It is written in primitives (mean over dim 1, centred square mean, rsqrt, scale) that coremltools
    fuses into one MIL ``layer_norm`` with ``axes=[1]``, and applies the affine as
    ``out * weight + bias`` — torch's order, NOT Apple's ``(out + bias) * weight`` whose weight
    conversion divides by weight. eps is kept as is (Apple's 1e-12 -> 1e-7 change is an fp16
    accuracy choice, not a layout one). A norm is converted only when its input comes from, or its
    output goes to, BC1S ops (a convertible linear, an existing layout change, or a region of
    element-wise ops that touches one), so a lone LayerNorm is left alone.
    Exact up to float re-association (same formula; the fused kernel sums in another order).
    """

    name = "ane_channel_layer_norm"
    exact = True
    fixes = ("aten.layer_norm",)  # over the last axis; MIL gets layer_norm over axis 1 instead

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        if not is_op(node, aten.layer_norm) or not _is_float(ctx, node):
            return False
        x = node.args[0]
        shape = ctx.shape(x)
        if shape is None or len(shape) != 3 or list(node.args[1]) != [shape[2]]:
            return False
        for param in node.args[2:4]:
            if param is not None and (ctx.constant(param) is None or ctx.shape(param) != (shape[2],)):
                return False
        return _near_bc1s(ctx, node)

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        x = node.args[0]
        weight = node.args[2] if len(node.args) > 2 else None
        bias = node.args[3] if len(node.args) > 3 else None
        eps = node.args[4] if len(node.args) > 4 else 1e-5
        y = _to_bc1s(ctx, x)
        mean = ctx.call(aten.mean.dim, y, [1], True)
        centred = ctx.call(aten.sub.Tensor, y, mean)
        var = ctx.call(aten.mean.dim, ctx.call(aten.mul.Tensor, centred, centred), [1], True)
        out = ctx.call(aten.mul.Tensor, centred, ctx.call(aten.rsqrt.default, ctx.call(aten.add.Tensor, var, eps)))
        if weight is not None:  # torch order: out * weight + bias (not Apple's (out + bias) * weight)
            w = ctx.constant(weight)
            out = ctx.call(aten.mul.Tensor, out, ctx.add_constant(w.reshape(-1, 1, 1), "ane_ln_weight"))
        if bias is not None:
            b = ctx.constant(bias)
            out = ctx.call(aten.add.Tensor, out, ctx.add_constant(b.reshape(-1, 1, 1), "ane_ln_bias"))
        ctx.replace(node, _from_bc1s(ctx, out))


def _near_bc1s(ctx: PassContext, norm: fx.Node) -> bool:
    """True if the norm's input or output touches BC1S ops, directly or through element-wise ops."""
    def produces(n: Any) -> bool:
        return _from_source(ctx, n) is not None or _convertible_linear(ctx, n)

    def consumes(u: fx.Node, via: fx.Node) -> bool:
        return _to_chain_end(ctx, u) is not None or (_convertible_linear(ctx, u) and u.args[0] is via)

    if produces(norm.args[0]) or any(consumes(u, norm) for u in norm.users):
        return True
    seen: set[fx.Node] = set()
    todo = [n for n in [norm.args[0], *norm.users] if _flippable(ctx, n)]
    while todo and len(seen) < 256:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for a in _tensor_args(n):
            if produces(a):
                return True
            if _flippable(ctx, a):
                todo.append(a)
        for u in n.users:
            if consumes(u, n):
                return True
            if _flippable(ctx, u):
                todo.append(u)
    return False
