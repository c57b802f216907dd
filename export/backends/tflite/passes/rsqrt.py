"""``sqrt_div_to_rsqrt``: a division by a square root as a multiplication by a reciprocal square root."""

from __future__ import annotations

from torch import fx

from edgevit.export.passes import register_pass
from edgevit.export.passes.base import GraphPass, PassContext, aten, is_op


@register_pass
class SqrtDivToRsqrt(GraphPass):
    """``div(x, sqrt(v))`` → ``mul(x, rsqrt(v))`` when ``sqrt(v)`` has no other reader.

    Before: ``(x - mean) / sqrt(var + eps)``, what ``decompose_layer_norm`` / ``decompose_group_norm`` write
    (Sqrt + Div: the op pair ONNX's NNAPI provider takes). After: ``(x - mean) * rsqrt(var + eps)``.
    Why, on LiteRT: the NNAPI delegate takes SQRT, DIV and RSQRT with float inputs only, so in a full-integer
    model each is a CPU op splitting the graph: one per norm instead of two. And ai-edge-quantizer's int8 DIV
    fails at run time when a calibrated divisor rounds to its zero point (``div.cc``: "data[i] !=
    zero_point"), which a DeiT's LayerNorm does on seeded inputs; an int8 RSQRT of that value saturates
    instead. Not exact: ``rsqrt`` and the product round twice where the quotient rounded once, so the result
    differs by at most ~3 fp32 units in the last place (relative), far inside the fp32 parity bound.
    """

    name = "sqrt_div_to_rsqrt"
    exact = False
    fixes = ("DIV", "SQRT")

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        if node.target is not aten.div.Tensor or len(node.args) != 2 or node.kwargs:
            return False
        root = node.args[1]
        return isinstance(root, fx.Node) and is_op(root, aten.sqrt) and len(ctx.users(root)) == 1

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        x, root = node.args
        ctx.replace(node, ctx.call(aten.mul.Tensor, x, ctx.call(aten.rsqrt.default, root.args[0])))
