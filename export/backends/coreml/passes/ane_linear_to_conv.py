"""``ane_linear_to_conv``: every ``linear`` on (B, S, C) / (B, C) tokens as a 1x1 ``conv2d`` on (B, C, 1, S).

The ANE's native matmul is the 1x1 convolution on channels-first 4-D tensors (ml-ane-transformers
principles); see the package docstring for the whole ANE layout.
"""

from __future__ import annotations

from torch import fx

from edgevit.export.backends.coreml.passes._layout import (
    _convertible_linear,
    _from_bc1s,
    _PruningPass,
    _to_bc1s,
)
from edgevit.export.passes import register_pass
from edgevit.export.passes.base import PassContext, aten
from edgevit.export.passes.repairs import ViewRepairing, dynamic_dims


@register_pass
class AneLinearToConv(ViewRepairing, _PruningPass):
    """``linear(x, W, b)`` on (B, S, C) / (B, C) tokens → ``conv2d`` 1x1 on (B, C, 1, S) / (B, C, 1, 1).

    Why: the ANE's native layout is channels-first 4-D and its native matmul is the 1x1 convolution
    (ml-ane-transformers replaces every ``nn.Linear`` by ``nn.Conv2d(k=1)`` with
    ``state_dict[k][:, :, None, None]`` and keeps tokens as (B, C, 1, S) "BC1S"; a rank-3 MIL ``linear`` is
    laid out with the channels in the last, 64-byte aligned axis instead). The
    token tensor goes in with ``transpose(1, 2).unsqueeze(2)`` and comes out with
    ``squeeze(2).transpose(1, 2)``; ``ane_cancel_transposes`` removes those layout changes between
    consecutive ANE ops. A (B, C) input (a classifier head) becomes (B, C, 1, 1), as in Apple's
    distilbert port. Only constant weights/biases are converted (Core ML's conv needs a const
    kernel); rank >= 4 inputs are left alone.
    Exact up to float re-association (the 1x1 conv sums the same products in another order).
    """

    name = "ane_linear_to_conv"
    exact = True
    fixes = ("linear", "aten.linear")  # MIL linear on rank-3 tokens

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        # the (B, C) form reshapes to (B, C, 1, 1): not when B depends on the data (x[mask] rows)
        x = node.args[0]
        return _convertible_linear(ctx, node) and not (ctx.rank(x) == 2 and dynamic_dims(ctx, x))

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        weight = ctx.constant(w)
        kernel = ctx.add_constant(weight[:, :, None, None], "ane_conv_weight")
        if ctx.rank(x) == 3:
            conv = ctx.call(aten.conv2d.default, _to_bc1s(ctx, x), kernel, b)
            out = _from_bc1s(ctx, conv)
        else:  # (B, C) -> (B, C, 1, 1) -> (B, O)
            batch, chans = ctx.shape(x)
            x4 = ctx.call(aten.reshape.default, x, [batch, chans, 1, 1])
            conv = ctx.call(aten.conv2d.default, x4, kernel, b)
            out = ctx.call(aten.reshape.default, conv, [batch, weight.shape[0]])
        ctx.replace(node, out)
