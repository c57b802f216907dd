"""Helpers the ANE passes share: the (B, S, C) <-> (B, C, 1, S) layout change and its recognisers,
which ops on (B, S, C) tensors can run unchanged in (B, C, 1, S) ("flippable"), constant evaluation,
and a pass base class that drops the constants its rewrites replaced.

``ane_linear_to_conv`` and ``ane_channel_layer_norm`` wrap their ops in the layout change;
``ane_channel_layer_norm`` (deciding whether a norm sits next to BC1S ops) and ``ane_cancel_transposes``
(moving element-wise regions into BC1S) both walk the flippable ops.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from edgevit.export.passes.base import Aliasing, GraphPass, PassContext, aten, is_op, writes_values

# --- the (B, S, C) <-> (B, C, 1, S) layout change ------------------------------------------------


def _to_bc1s(ctx: PassContext, x: fx.Node) -> fx.Node:
    """(B, S, C) -> (B, C, 1, S): Apple's ``x.transpose(1, 2).unsqueeze(2)``."""
    return ctx.call(aten.unsqueeze.default, ctx.call(aten.transpose.int, x, 1, 2), 2)


def _from_bc1s(ctx: PassContext, y: fx.Node) -> fx.Node:
    """(B, C, 1, S) -> (B, S, C): ``y.squeeze(2).transpose(1, 2)``."""
    return ctx.call(aten.transpose.int, ctx.call(aten.squeeze.dim, y, 2), 1, 2)


def _dims(node: fx.Node, rank: int) -> tuple[int, int]:
    a, b = node.args[1], node.args[2]
    return tuple(sorted((a % rank, b % rank)))  # type: ignore[return-value]


def _from_source(ctx: PassContext, node: Any) -> fx.Node | None:
    """If ``node`` is ``squeeze(y, 2).transpose(1, 2)`` of a (B, C, 1, S) ``y``, return ``y``."""
    if not is_op(node, aten.transpose) or ctx.rank(node) != 3 or _dims(node, 3) != (1, 2):
        return None
    sq = node.args[0]
    if not (is_op(sq, aten.squeeze) and len(sq.args) > 1):
        return None
    dims = sq.args[1] if isinstance(sq.args[1], (list, tuple)) else [sq.args[1]]
    y = sq.args[0]
    shape = ctx.shape(y)
    if shape is None or len(shape) != 4 or [d % 4 for d in dims] != [2] or shape[2] != 1:
        return None
    return y


def _to_chain_end(ctx: PassContext, user: fx.Node) -> fx.Node | None:
    """If ``user`` starts ``x.transpose(1, 2).unsqueeze(2)`` on a rank-3 ``x``, the unsqueeze node."""
    if not is_op(user, aten.transpose) or ctx.rank(user.args[0]) != 3 or _dims(user, 3) != (1, 2):
        return None
    if len(user.users) != 1:
        return None
    (unsq,) = user.users
    if is_op(unsq, aten.unsqueeze) and unsq.args[1] % 4 == 2:
        return unsq
    return None


def _is_float(ctx: PassContext, node: Any) -> bool:
    v = ctx.val(node)
    return isinstance(v, torch.Tensor) and v.dtype in (torch.float32, torch.float16, torch.bfloat16)


def _convertible_linear(ctx: PassContext, node: Any) -> bool:
    """``linear(x, W, b)`` with x of rank 2/3 and constant W (O, C) and b (O,) or None."""
    if not is_op(node, aten.linear) or not _is_float(ctx, node):
        return False
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if ctx.rank(x) not in (2, 3):
        return False
    weight = ctx.constant(w)
    if weight is None or weight.dim() != 2:
        return False
    if b is not None:
        bias = ctx.constant(b)
        if bias is None or bias.shape != (weight.shape[0],):
            return False
    return True


def _get_attr_targets(ctx: PassContext) -> set[str]:
    return {str(n.target) for n in ctx.graph.nodes if n.op == "get_attr"}


def _drop_dead_attrs(ctx: PassContext, before: set[str]) -> None:
    """Delete parameters/buffers a pass replaced by re-laid-out copies (the (O, C) linear weight once
    the (O, C, 1, 1) kernel exists), so the re-captured program does not carry both."""
    ctx.graph.eliminate_dead_code()
    for target in before - _get_attr_targets(ctx):
        *path, attr = target.split(".")
        owner: Any = ctx.gm
        for part in path:
            owner = getattr(owner, part)
        if isinstance(getattr(owner, attr, None), torch.Tensor):
            delattr(owner, attr)


class _PruningPass(GraphPass):
    """A graph pass that drops the constants its rewrites left unused."""

    def run(self, ctx: PassContext) -> int:
        before = _get_attr_targets(ctx)
        sites = self._run(ctx)
        if sites:
            _drop_dead_attrs(ctx, before)
        return sites

    def _run(self, ctx: PassContext) -> int:
        return super().run(ctx)


# --- ops that run unchanged (up to dim renaming) on (B, C, 1, S) ---------------------------------

_UNARY = (aten.gelu, aten.relu, aten.silu, aten.sigmoid, aten.tanh, aten.hardswish, aten.hardsigmoid,
          aten.erf, aten.exp, aten.neg, aten.abs, aten.sqrt, aten.rsqrt, aten.leaky_relu, aten.elu,
          aten.clamp, aten.hardtanh, aten.relu6, aten.square, aten.reciprocal, aten.log)
_BINARY = (aten.add, aten.sub, aten.mul, aten.div, aten.maximum, aten.minimum, aten.rsub)
_MAX_INDEX_NUMEL = 1 << 22  # the chain canonicaliser runs the chain on an index tensor of this size


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]


def _flippable(ctx: PassContext, node: Any) -> bool:
    """An op on a rank-3 (B, S, C) tensor that can run unchanged (up to dim renaming) on (B, C, 1, S)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if is_op(node, aten.split, aten.split_with_sizes):  # q/k/v split of a fused projection
        x = node.args[0]
        return (ctx.rank(x) == 3 and _is_float(ctx, x) and not node.kwargs
                and all(not isinstance(a, fx.Node) for a in node.args[1:]))
    if node.target is operator.getitem:
        return _flippable(ctx, node.args[0])
    if ctx.rank(node) != 3 or not _is_float(ctx, node):
        return False
    if is_op(node, *_UNARY):
        return all(not isinstance(a, fx.Node) for a in node.args[1:])
    if is_op(node, *_BINARY):
        for a in node.args:
            if isinstance(a, fx.Node) and ctx.rank(a) not in (0, 3) and _const_value(ctx, a) is None:
                return False
        return not node.kwargs or set(node.kwargs) <= {"alpha"}
    if is_op(node, aten.cat):
        return len(node.args) <= 2 and all(ctx.rank(a) == 3 for a in node.args[0])
    if is_op(node, aten.slice):
        return node.args[0] is not None and ctx.rank(node.args[0]) == 3
    return False


def _const_value(ctx: PassContext, node: Any, depth: int = 4) -> torch.Tensor | None:
    """The value of a node computed from constants only (e.g. ``expand(cls_token)``), else None.

    Not for a tensor an in-place op writes (``self.count.add_(1)``: a buffer changed on every run) or an
    in-place op itself: evaluating one here would write the real buffer while the pass runs.
    """
    if not isinstance(node, fx.Node) or writes_values(node) or Aliasing.of(ctx).written(node):
        return None
    value = ctx.constant(node)
    if value is not None or depth == 0 or node.op != "call_function":
        return value
    if not isinstance(ctx.val(node), torch.Tensor) or ctx.val(node).numel() > _MAX_INDEX_NUMEL:
        return None
    env: dict[fx.Node, Any] = {}
    for a in node.all_input_nodes:
        v = _const_value(ctx, a, depth - 1)
        if v is None:
            return None
        env[a] = v
    args = fx.node.map_arg(node.args, lambda a: env[a])
    kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
    with torch.no_grad():
        return node.target(*args, **kwargs)  # type: ignore[operator]
