"""Projection splitting: a fused Linear read column range by column range becomes one Linear per range."""

from __future__ import annotations

from torch import fx

from edgevit.export.passes import register_pass
from edgevit.export.passes.base import (
    GraphPass,
    PassContext,
    aten,
    column_readers,
    is_op,
    linear_constants,
)


@register_pass
class SplitFusedProjection(GraphPass):
    """``linear(x, W, b)`` read only as column ranges (a last-dim split or slices) → one Linear per range.

    What: the fused ``qkv`` projection of an attention block, split into q, k and v, becomes three
    Linears on the row blocks W[0:C], W[C:2C], W[2C:3C] (biases likewise); a range nobody reads is not
    computed at all. Only constant weights, only when every reader takes whole columns and no two
    readers overlap.
    Why: litert-torch lowers the split to one SLICE per chunk, each a strided copy of a (N, C) block
    that XNNPACK runs as its own operator (DeiT-Tiny: 36 SLICEs); three FULLY_CONNECTEDs write their
    outputs directly. Measured on this repo's 2-core x86 CPU, DeiT-Tiny, interleaved A/B medians of
    per-run ratios: LiteRT + XNNPACK 0.97-0.98, OpenVINO CPU 0.96-0.97; onnxruntime CPU neutral (0.98,
    medians equal, within its noise), so it stays out of the onnx pipelines, as do the Core ML and
    GPU/NPU ones (not measured).
    Exact up to fp32 rounding: each output column is the same dot product of the same row of x (a GEMM
    blocked differently may sum it in another order; DeiT-Tiny in PyTorch: bit-identical outputs).
    """

    name = "split_fused_projection"
    exact = True

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        if not is_op(node, aten.linear) or ctx.shape(node) is None or not node.users:
            return False
        weight, _ = linear_constants(ctx, node)
        readers = None if weight is None else column_readers(ctx, node)
        whole = [(0, ctx.shape(node)[-1])]
        return readers is not None and [(start, end) for _, start, end in readers] != whole

    def rewrite(self, ctx: PassContext, node: fx.Node) -> bool:
        readers = column_readers(ctx, node)
        weight, bias = linear_constants(ctx, node)
        for reader, start, end in readers:
            rows_weight = ctx.add_constant(weight[start:end], "projection_weight")
            rows_bias = None if bias is None else ctx.add_constant(bias[start:end], "projection_bias")
            ctx.replace(reader, ctx.call(aten.linear.default, node.args[0], rows_weight, rows_bias))
        return True


@register_pass
class SplitFusedConvProjection(GraphPass):
    """A 1x1 ``conv2d(x, W, b)`` read only as channel ranges (a dim-1 split or slices) → one conv per range.

    What: MobileViT-v2's fused projection ``qkv_proj(x).split([1, d, d], dim=1)`` becomes three 1x1
    convolutions on the weight blocks W[0:1], W[1:1+d], W[1+d:1+2d] (biases likewise); a range nobody
    reads is not computed. Only constant weights, stride 1, no padding, no dilation, one group, and only
    when every reader takes whole channels and no two readers overlap.
    Why: OpenVINO's CPU plugin runs the channel split of a blocked-layout tensor with its reference
    VariadicSplit kernel: 0.9 ms of MobileViT-v2-0.5's 5.3 ms at int8 and 0.85 of 8.2 ms at fp32 on this
    repo's 2-core x86 CPU (9 splits); three convolutions write their outputs directly.
    Exact up to fp32 rounding: each output channel is the same dot product of the same input pixel.
    """

    name = "split_fused_conv_projection"
    exact = True

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        if not is_op(node, aten.conv2d) or ctx.rank(node) != 4 or not node.users or not _pointwise_conv(node):
            return False
        weight, _ = linear_constants(ctx, node)
        if weight is None or tuple(weight.shape[2:]) != (1, 1):
            return False
        readers = column_readers(ctx, node, dim=1)
        return readers is not None and [(s, e) for _, s, e in readers] != [(0, ctx.shape(node)[1])]

    def rewrite(self, ctx: PassContext, node: fx.Node) -> bool:
        weight, bias = linear_constants(ctx, node)
        for reader, start, end in column_readers(ctx, node, dim=1):
            rows_weight = ctx.add_constant(weight[start:end], "projection_weight")
            rows_bias = None if bias is None else ctx.add_constant(bias[start:end], "projection_bias")
            ctx.replace(reader, ctx.call(aten.conv2d.default, node.args[0], rows_weight, rows_bias))
        return True


def _pointwise_conv(node: fx.Node) -> bool:
    """conv2d(x, w, b, stride, padding, dilation, groups) with the defaults: stride 1, no padding, groups 1."""
    args = list(node.args) + [None] * (7 - len(node.args))
    stride, padding, dilation, groups = args[3:7]
    ones = (None, 1, [1, 1], (1, 1))
    return stride in ones and padding in (None, 0, [0, 0], (0, 0)) and dilation in ones and groups in (None, 1)
