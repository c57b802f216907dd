"""``softmax_last_axis``: softmax / log_softmax over any axis as a softmax over the last one.

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
    dim=1 on purpose (R3), nor by OpenVINO, which handles any axis.
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
