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
