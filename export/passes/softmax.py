"""Softmax layout passes: ``softmax_last_axis`` (any axis as the last one) and ``softmax_drop_unit_dims``
(a last-axis softmax on a tensor without its inner unit dims, so a converter's layout change cannot move the axis).

Like every attention-related pass, it matches plain ATen patterns (any model, not only the zoo) and
leaves a site alone when a shape, a dtype or a constant it needs is unknown.
"""

from __future__ import annotations

from torch import fx

from edgevit.export.passes import register_pass
from edgevit.export.passes.repairs import ViewRepairing
from edgevit.export.passes.base import GraphPass, PassContext, aten, is_op

_SOFTMAXES = (aten.softmax, aten._softmax, aten._safe_softmax, aten.log_softmax, aten._log_softmax)


def _norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


@register_pass
class SoftmaxLastAxis(ViewRepairing, GraphPass):
    """``softmax`` / ``log_softmax`` over a non-last axis → transpose, softmax(-1), transpose back.

    Why: TFLite's SOFTMAX has no axis (the reference kernel normalises the trailing dim; the GPU
    parser sets ``axis = CHANNELS // always by channels``) — litert-torch 0.10
    lowers ``softmax(x, dim=1)`` to six ops (REDUCE_MAX, MAXIMUM, SUB, EXP, SUM, DIV) instead of
    one SOFTMAX; the ORT XNNPACK EP takes ``Softmax`` only when ``axis`` is the last dim
    (xnnpack/math/softmax.cc). Not wanted by Core ML: the ANE layout (B, C, 1, S) normalises over
    dim=1 on purpose, nor by OpenVINO, which handles any axis.
    Exact up to float re-association: the same reduction runs over the same elements; the kernel's
    summation order can differ, so outputs agree to ~(n+3)·2⁻²⁴ relative (n = softmax length).
    The result is a transposed view; a later ``view`` that needs the original strides becomes a
    ``reshape`` (``x.softmax(1).view(B, -1)``).
    """

    name = "softmax_last_axis"
    fixes = ("Softmax(axis!=-1)", "LogSoftmax(axis!=-1)", "softmax axis")

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        if not is_op(node, *_SOFTMAXES) or len(node.args) < 2:
            return False
        rank = ctx.rank(node.args[0])
        dim = node.args[1]
        return rank is not None and rank > 1 and isinstance(dim, int) and _norm_dim(dim, rank) != rank - 1

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        x, dim = node.args[0], _norm_dim(node.args[1], ctx.rank(node.args[0]))
        moved = ctx.call(aten.transpose.int, x, dim, -1)
        inner = ctx.call(node.target, moved, -1, *node.args[2:], **node.kwargs)
        ctx.replace(node, ctx.call(aten.transpose.int, inner, dim, -1))


@register_pass
class SoftmaxDropUnitDims(ViewRepairing, GraphPass):
    """A last-axis softmax on a tensor with unit dims between batch and last → reshape them away and back.

    Also ``log_softmax``. Before: ``softmax(q: (B, 1, P, N), -1)`` where ``q`` is a channel slice of a 1x1
    conv (MobileViT v2's separable attention). After: ``reshape(softmax(reshape(q, (B, P, N)), -1), (B, 1, P, N))``.
    Why: litert-torch lowers the conv in NHWC between transposes; the converter's layout propagation then
    treats the transpose of a tensor with one channel as a reshape, moves it past the softmax and leaves a
    softmax over a non-last NHWC axis, which it writes as six ops (REDUCE_MAX, MAXIMUM, SUB, EXP, SUM, DIV)
    instead of one SOFTMAX. EXP and REDUCE_MAX stay float in a full-integer model (no int8 form in
    ai-edge-quantizer; the NNAPI delegate has no int8 EXP/SUM/DIV either). Without the unit dim the transpose
    is not a reshape and the SOFTMAX survives. On XNNPACK in fp32 both forms take the same time
    (MobileViT-v2-0.5, interleaved A/B: 1.00x). Exact: the reshapes are views; the same softmax runs on the
    same rows. Batch is kept (dim 0), and a softmax without an inner unit dim is left alone (DeiT's (B, H, N, N)).
    """

    name = "softmax_drop_unit_dims"
    fixes = ("EXP", "REDUCE_MAX", "split softmax")

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        if not is_op(node, *_SOFTMAXES) or len(node.args) < 2 or not isinstance(node.args[1], int):
            return False
        shape = ctx.shape(node.args[0])
        if shape is None or len(shape) < 3 or _norm_dim(node.args[1], len(shape)) != len(shape) - 1:
            return False
        return 1 in shape[1:-1]

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        x, shape = node.args[0], list(ctx.shape(node.args[0]))
        kept = [shape[0]] + [d for d in shape[1:-1] if d != 1] + [shape[-1]]
        flat = ctx.call(aten.reshape.default, x, kept)
        inner = ctx.call(node.target, flat, -1, *node.args[2:], **node.kwargs)
        ctx.replace(node, ctx.call(aten.reshape.default, inner, shape))
