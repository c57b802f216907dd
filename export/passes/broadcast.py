"""``expand_to_broadcast``: ``expand`` / ``expand_as`` / ``repeat`` that only broadcast, left to the
element-wise ops that read them (implicit same-rank broadcasting).

Like every attention-related pass, it matches plain ATen patterns (any model, not only the zoo) and
leaves a site alone when a shape, a dtype or a constant it needs is unknown.
"""

from __future__ import annotations

import torch
from torch import fx

from edgevit.export.passes import register_pass
from edgevit.export.passes.base import Aliasing, GraphPass, PassContext, aten, is_op

# Element-wise ops that broadcast every tensor operand (out-of-place only: in-place self can't).
_BROADCASTING = (
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.div.Tensor_mode,
    aten.rsub.Tensor, aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf,
    aten.maximum.default, aten.minimum.default, aten.pow.Tensor_Tensor, aten.atan2.default,
    aten.eq.Tensor, aten.ne.Tensor, aten.lt.Tensor, aten.le.Tensor, aten.gt.Tensor, aten.ge.Tensor,
    aten.logical_and.default, aten.logical_or.default, aten.logical_xor.default,
    aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.fmod.Tensor, aten.remainder.Tensor,
    aten.copysign.Tensor, aten.hypot.default, aten.fmax.default, aten.fmin.default,
    aten.floor_divide.default, aten.clamp.Tensor, aten.lerp.Tensor, aten.addcmul.default,
    aten.addcdiv.default,
)


def _broadcast_source(ctx: PassContext, node: fx.Node) -> fx.Node | None:
    """The un-expanded input of an expand / expand_as / repeat that only broadcasts, else None."""
    src = node.args[0]
    in_shape, out_shape = ctx.shape(src), ctx.shape(node)
    if not isinstance(src, fx.Node) or in_shape is None or out_shape is None:
        return None
    if len(in_shape) > len(out_shape):
        return None
    aligned = (1,) * (len(out_shape) - len(in_shape)) + in_shape
    if is_op(node, aten.repeat):  # tiling a size-1 dim is broadcasting; tiling a larger one is not
        reps = list(node.args[1])
        reps = [1] * (len(out_shape) - len(reps)) + reps
        ok = all(r == 1 or s == 1 for s, r in zip(aligned, reps))
    else:
        ok = all(s == o or s == 1 for s, o in zip(aligned, out_shape))
    return src if ok else None


def _user_keeps_shape(ctx: PassContext, user: fx.Node, old: fx.Node, new_shape: tuple[int, ...]) -> bool:
    """True when ``user`` is a broadcasting element-wise op whose output shape survives the swap."""
    if user.target not in _BROADCASTING or old in user.kwargs.values():
        return False
    shapes = []
    for a in user.args:
        if a is old:
            shapes.append(new_shape)
        elif isinstance(a, fx.Node):
            s = ctx.shape(a)
            if s is None:
                return False
            shapes.append(s)
    out = ctx.shape(user)
    try:
        if tuple(torch.broadcast_shapes(*shapes)) != out:
            return False
    except RuntimeError:
        return False
    # One operand must still cover the output: a mutual broadcast ((1,N,1) x (1,1,C)) is what the
    # TFLite GPU rules reject ("MUL requires one tensor that not less than second in all dimensions").
    return any((1,) * (len(out) - len(s)) + tuple(s) == out for s in shapes)


@register_pass
class ExpandToBroadcast(GraphPass):
    """``expand`` / ``expand_as`` / ``repeat`` feeding only broadcasting element-wise ops → removed.

    The small operand is reshaped to the same rank with leading singleton dims when its rank is
    lower; an expand / repeat that does not change the shape (``cls_token.expand(1, -1, -1)`` at
    batch 1) is dropped whatever its users, and one that only inserts size-1 dims becomes a reshape.
    Why: ONNX ``Expand`` is in neither the NNAPI nor the Core ML EP op list of the
    ORT mobile checker (each one splits the graph); a materialised broadcast becomes TFLite
    BROADCAST_TO, which the LiteRT GPU accelerator rejects (LiteRT#9191); ``repeat`` for
    broadcasting failed in litert-torch#715. Same-rank numpy broadcasting is what every backend
    takes; an expand is kept when removing it would leave no operand covering the output (a mutual
    broadcast, which the TFLite GPU MUL rule rejects). Exact: the element-wise op reads the same
    values. A ``repeat`` (a copy, unlike ``expand``) whose source or result an in-place op writes is
    left alone: without the copy the write would reach both.
    """

    name = "expand_to_broadcast"
    fixes = ("Expand", "BROADCAST_TO", "expand", "Tile")

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        if not is_op(node, aten.expand, aten.expand_as, aten.repeat):
            return False
        src = _broadcast_source(ctx, node)
        if src is None:
            return False
        if is_op(node, aten.repeat) and (Aliasing.of(ctx).written(node) or Aliasing.of(ctx).written(src)):
            return False  # repeat copies: as its source (or a view of it), an in-place write would reach both
        if self._inserts_only_ones(ctx, src, node):
            return True
        target = self._aligned_shape(ctx, src, node)
        return bool(node.users) and all(_user_keeps_shape(ctx, u, node, target) for u in node.users)

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        src = _broadcast_source(ctx, node)
        if self._inserts_only_ones(ctx, src, node):
            shape = ctx.shape(node)
        else:
            shape = self._aligned_shape(ctx, src, node)
        new = src if ctx.shape(src) == shape else ctx.call(aten.reshape.default, src, list(shape))
        ctx.replace(node, new)

    @staticmethod
    def _inserts_only_ones(ctx: PassContext, src: fx.Node, node: fx.Node) -> bool:
        """Same elements in the same order: the expand/repeat is a no-op or a reshape."""
        return ctx.val(src).numel() == ctx.val(node).numel()

    @staticmethod
    def _aligned_shape(ctx: PassContext, src: fx.Node, node: fx.Node) -> tuple[int, ...]:
        in_shape, rank = ctx.shape(src), ctx.rank(node)
        return (1,) * (rank - len(in_shape)) + in_shape
