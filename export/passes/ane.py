"""Apple Neural Engine layout for Core ML: token tensors in (B, C, 1, S), linears as 1x1 convs.

Apple's ml-ane-transformers principles: the ANE's native layout is channels-first
4-D, so a sequence of S tokens with C channels is kept as (B, C, 1, S) (A1), every ``nn.Linear``
becomes a 1x1 ``Conv2d`` (A2) and LayerNorm normalises over dim 1 of that tensor (A6/R7). Apple does
this by rewriting the model by hand (reference model and ANE model side by side, checked by a
numerical equivalence test); here it is graph passes that apply to any captured model (three in this file, a fourth in
``ane_attention.py``):

* ``ane_linear_to_conv`` wraps every ``linear`` on (B, S, C) / (B, C) in layout changes around a
  ``conv2d`` with the weight as a constant (O, C, 1, 1) kernel;
* ``ane_channel_layer_norm`` does the same for LayerNorm over the last dim (channel-axis norm in
  primitives, ``out * weight + bias`` order);
* ``ane_cancel_transposes`` then moves whole regions of element-wise ops (residual adds, GELU, ...)
  into (B, C, 1, S) and cancels every chain of layout ops that composes to nothing (or shortens it),
  so an MLP fc1 -> gelu -> fc2 and the residual stream stay in (B, C, 1, S) throughout.

Per-head attention splitting (A3/A4/A5: one einsum pair per head, softmax on dim 1) is the fourth
ANE pass, ``ane_split_heads`` (``ane_attention.py``); it runs between ``ane_linear_to_conv`` and
``ane_cancel_transposes``, and the chain canonicaliser then reads each head's q/k/v chunk straight
out of the (B, 3C, 1, S) conv output (a channel ``slice``; k one ``transpose(1, 3)``) and the
concatenated heads go straight into the output conv.

Prediction of a Core ML model cannot run on Linux: the tests only show the converted MIL program
has ``conv`` on rank-4 (B, C, 1, S) tensors instead of ``linear`` on rank-3 ones. The latency
benefit is Apple's published claim (machinelearning.apple.com/research/neural-engine-transformers),
not measured here.
"""

from __future__ import annotations

import contextlib
import copy
import math
import operator
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import fx

from edgevit.export.passes import register_pass
from edgevit.export.passes.repairs import ViewRepairing, dynamic_dims
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


# --- pass 1: linear -> 1x1 conv ----------------------------------------------------------------


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


# --- pass 2: LayerNorm over the channel axis ----------------------------------------------------


@register_pass
class AneChannelLayerNorm(ViewRepairing, _PruningPass):
    """``layer_norm(x, [C])`` on (B, S, C) next to BC1S ops → normalisation over dim 1 of (B, C, 1, S).

    Why: once the linears are 1x1 convs on (B, C, 1, S) (``ane_linear_to_conv``), a LayerNorm over the
    last dim of (B, S, C) forces a layout change back and forth around every norm; Apple's
    ``LayerNormANE`` normalises over dim 1 of the BC1S tensor instead.
    It is written in primitives (mean over dim 1, centred square mean, rsqrt, scale) that coremltools
    fuses into one MIL ``layer_norm`` with ``axes=[1]``, and applies the affine as
    ``out * weight + bias`` — torch's order, NOT Apple's ``(out + bias) * weight`` whose weight
    conversion divides by weight (R7). eps is kept as is (Apple's 1e-12 -> 1e-7 change is an fp16
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


# --- pass 3: move element-wise regions into BC1S and cancel layout chains ------------------------

_UNARY = (aten.gelu, aten.relu, aten.silu, aten.sigmoid, aten.tanh, aten.hardswish, aten.hardsigmoid,
          aten.erf, aten.exp, aten.neg, aten.abs, aten.sqrt, aten.rsqrt, aten.leaky_relu, aten.elu,
          aten.clamp, aten.hardtanh, aten.relu6, aten.square, aten.reciprocal, aten.log)
_BINARY = (aten.add, aten.sub, aten.mul, aten.div, aten.maximum, aten.minimum, aten.rsub)
# Ops that only move data: their output is a fixed gather of their single tensor input.
_MOVES = (aten.transpose, aten.permute, aten.squeeze, aten.unsqueeze, aten.reshape, aten.view,
          aten._unsafe_view, aten.flatten, aten.unflatten, aten.slice, aten.select)
_SPLITS = (aten.split, aten.split_with_sizes, aten.chunk, aten.unbind)
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


_DIM_MAP = {0: 0, 1: 3, 2: 1}  # (B, S, C) axis -> (B, C, 1, S) axis


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


def _const_to_bc1s(value: torch.Tensor) -> torch.Tensor:
    """A constant operand broadcast against (B, S, C), re-laid out to broadcast against (B, C, 1, S)."""
    if value.numel() == 1:
        return value
    v3 = value.reshape((1,) * (3 - value.dim()) + tuple(value.shape))
    return v3.transpose(1, 2).unsqueeze(2)


@dataclass
class _Region:
    nodes: list[fx.Node]


def _regions(ctx: PassContext) -> list[_Region]:
    """Connected groups of flippable ops (connected through producer -> consumer edges)."""
    members = [n for n in ctx.graph.nodes if _flippable(ctx, n)]
    parent = {n: n for n in members}

    def find(n: fx.Node) -> fx.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in members:
        for a in n.all_input_nodes:
            if a in parent:
                parent[find(a)] = find(n)
    groups: dict[fx.Node, list[fx.Node]] = {}
    for n in members:
        groups.setdefault(find(n), []).append(n)
    return [_Region(g) for g in groups.values()]


def _token_mean(ctx: PassContext, user: fx.Node, n: fx.Node) -> bool:
    """``mean(n, [1])`` without keepdim: global average pooling over the tokens of (B, S, C)."""
    if not is_op(user, aten.mean) or user.args[0] is not n or len(user.args) < 2 or user.kwargs:
        return False
    dims, keep = user.args[1], (user.args[2] if len(user.args) > 2 else False)
    return isinstance(dims, (list, tuple)) and [d % 3 for d in dims] == [1] and not keep


def _flip_gain(ctx: PassContext, region: _Region) -> int:
    """Layout ops saved (positive) or added (negative) by running ``region`` in BC1S.

    Counted per boundary: an input that is a ``from_bc1s`` chain used only inside the region or by
    ``to_bc1s`` chains disappears (+2); a constant input is re-laid out for free; any other input
    needs a ``to_bc1s`` (-2, or -1 for a plain (1, 2) transpose that then folds into a reshape, 0 if
    it already has one). An output read by a ``to_bc1s`` chain cancels it (+2); an output read by
    anything else needs one ``from_bc1s`` (-2).
    """
    inside = set(region.nodes)
    gain = 0
    seen_inputs: set[fx.Node] = set()
    for n in region.nodes:
        for a in n.all_input_nodes:
            if a in inside or a in seen_inputs or ctx.shape(a) is None:
                continue
            seen_inputs.add(a)
            if _from_source(ctx, a) is not None:
                dies = all(u in inside or _to_chain_end(ctx, u) is not None for u in a.users)
                gain += 2 if dies else 0
            elif ctx.val(a).dim() == 0 or _const_value(ctx, a) is not None:
                continue
            elif any(_to_chain_end(ctx, u) is not None for u in a.users):
                continue
            elif is_op(a, aten.transpose) and _dims(a, 3) == (1, 2):
                gain -= 1
            else:
                gain -= 2
        outside = [u for u in n.users if u not in inside]
        to_users = [u for u in outside if _to_chain_end(ctx, u) is not None]
        pools = [u for u in outside if _token_mean(ctx, u, n)]
        others = [u for u in outside if u not in to_users and u not in pools]
        gain += 2 * len(to_users) - len(pools)  # a pooled (B, C, 1, 1) leaves with one reshape
        if len(others) == 1:  # the from_bc1s may fold into the layout ops that follow
            absorbed = _absorb_gain(ctx, n, others[0])
            gain += -2 if absorbed is None else max(-2, absorbed)
        elif others:
            gain -= 2
    return gain


def _absorb_gain(ctx: PassContext, n: fx.Node, user: fx.Node) -> int | None:
    """Ops saved if ``from_bc1s(n')`` and the layout ops after it (``user`` on) are canonicalised
    together, compared with those ops alone (None when they do not combine)."""
    b, s, c = ctx.shape(n)  # type: ignore[misc]
    if b * s * c > _MAX_INDEX_NUMEL:
        return None
    chain: list[fx.Node] = []
    prev, cur = n, user
    while len(chain) < 6:
        step = _step(cur)
        if step is None or step.src is not prev or cur.target is operator.getitem:
            break
        chain.append(cur)
        if len(cur.users) != 1:
            break
        prev, cur = cur, next(iter(cur.users))
    best: int | None = None
    with _single_thread():
        index = torch.arange(b * c * s, dtype=torch.int32).reshape(b, c, 1, s).squeeze(2).transpose(1, 2)
        for j, node in enumerate(chain, start=1):
            try:
                index = node.target(index, *node.args[1:], **node.kwargs)
            except RuntimeError:
                break
            code = _canonical((b, c, 1, s), index)
            if code is not None and (best is None or j - len(code) > best):
                best = j - len(code)
    return best


def _flip(ctx: PassContext, region: _Region) -> None:
    """Rebuild ``region`` on (B, C, 1, S) tensors and reconnect its boundary."""
    inside = set(region.nodes)
    new: dict[fx.Node, fx.Node] = {}
    converted: dict[fx.Node, fx.Node] = {}

    def to_bc1s(a: fx.Node) -> fx.Node:
        if a in new:
            return new[a]
        if a in converted:
            return converted[a]
        src = _from_source(ctx, a)
        if src is not None:
            converted[a] = src
        elif ctx.val(a).dim() == 0:
            converted[a] = a
        elif (value := _const_value(ctx, a)) is not None:
            with ctx.graph.inserting_before(a.next):
                converted[a] = ctx.add_constant(_const_to_bc1s(value), "ane_bc1s_const")
        else:
            with ctx.graph.inserting_before(a.next):  # right after a: before every user of a
                converted[a] = _to_bc1s(ctx, a)
            for u in list(a.users):  # existing to_bc1s chains of a: share the new one
                end = _to_chain_end(ctx, u)
                if end is not None and end is not converted[a]:
                    ctx.replace(end, converted[a])
        return converted[a]

    for n in region.nodes:  # graph order, so every member input is rebuilt before its users
        with ctx.graph.inserting_before(n):
            args = fx.node.map_arg(n.args, to_bc1s)
            if is_op(n, aten.cat):
                dim = n.args[1] if len(n.args) > 1 else 0
                args = (args[0], _DIM_MAP[dim % 3])
            elif is_op(n, aten.slice):
                dim = n.args[1] if len(n.args) > 1 else 0
                args = (args[0], _DIM_MAP[dim % 3], *args[2:])
            elif is_op(n, aten.split, aten.split_with_sizes):
                dim = n.args[2] if len(n.args) > 2 else 0
                args = (args[0], args[1], _DIM_MAP[dim % 3])
            new[n] = ctx.call(n.target, *args, **dict(n.kwargs))
    for n in region.nodes:
        back: fx.Node | None = None
        for u in list(n.users):
            if u in inside:
                continue
            end = _to_chain_end(ctx, u)
            if end is not None:
                ctx.replace(end, new[n])
                continue
            if _token_mean(ctx, u, n):  # pool over S on (B, C, 1, S), leave as (B, C)
                with ctx.graph.inserting_before(u):
                    pooled = ctx.call(aten.mean.dim, new[n], [3], True)
                    ctx.replace(u, ctx.call(aten.reshape.default, pooled, list(ctx.shape(u))))
                continue
            if back is None:
                with ctx.graph.inserting_before(new[n].next):
                    back = _from_bc1s(ctx, new[n])
            u.replace_input_with(n, back)


# --- chain canonicalisation ------------------------------------------------------------------


@dataclass
class _Step:
    out: fx.Node  # the node whose value the step produces
    src: fx.Node  # its tensor input
    cost: int  # layout ops it contributes (a split + getitem pair counts 1)
    private: bool  # True if removing the chain end also removes this step


def _step(node: fx.Node) -> _Step | None:
    """The data-movement step producing ``node``, or None."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem:
        split = node.args[0]
        if not (is_op(split, *_SPLITS) and isinstance(split.args[0], fx.Node)):
            return None
        if any(isinstance(a, fx.Node) for a in split.args[1:]):
            return None
        return _Step(node, split.args[0], 1, len(split.users) == 1)
    if not is_op(node, *_MOVES) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.all_input_nodes != [node.args[0]] or node.target is aten.view.dtype:
        return None  # x.view(torch.int32) reinterprets the bits: not a move of the elements
    return _Step(node, node.args[0], 1, True)


def _chain(end: fx.Node, limit: int = 12) -> list[_Step]:
    """The data-movement steps ending at ``end``, last step first."""
    steps: list[_Step] = []
    node = end
    while len(steps) < limit:
        step = _step(node)
        if step is None or not isinstance(step.src.meta.get("val"), torch.Tensor):
            break
        steps.append(step)
        node = step.src
    return steps


def _run_steps(index: torch.Tensor, steps: Sequence[_Step]) -> torch.Tensor:
    """Apply ``steps`` (first step first) to an index tensor: where each output element comes from."""
    for step in steps:
        node = step.out
        if node.target is operator.getitem:
            split = node.args[0]
            index = split.target(index, *split.args[1:], **split.kwargs)[node.args[1]]
        else:
            index = node.target(index, *node.args[1:], **node.kwargs)
    return index


def _try_run_steps(index: torch.Tensor, steps: Sequence[_Step]) -> torch.Tensor | None:
    try:  # a ``view`` that worked on the real (differently strided) input may refuse the index
        return _run_steps(index, steps)
    except RuntimeError:
        return None


_Instr = tuple[Any, tuple]


def _canonical(src_shape: tuple[int, ...], index: torch.Tensor) -> list[_Instr] | None:
    """The shortest ``slice* -> [reshape] -> permute? -> reshape?`` form of a gather, or None."""
    out_shape = tuple(index.shape)
    flat = index.flatten().long()
    if flat.numel() == 0:  # every chain step is an injective gather, so no duplicate check is needed
        return None
    coords = torch.unravel_index(flat, src_shape)
    lows = [int(c.min()) for c in coords]
    counts = [int(c.max()) - lo + 1 for c, lo in zip(coords, lows)]
    if math.prod(counts) != flat.numel():  # not a box of the source
        return None
    code: list[_Instr] = [(aten.slice.Tensor, (d, lows[d], lows[d] + counts[d]))
                          for d in range(len(src_shape)) if counts[d] != src_shape[d]]
    strides = [math.prod(counts[d + 1:]) for d in range(len(counts))]
    local = sum((c - lo) * s for c, lo, s in zip(coords, lows, strides))
    if torch.equal(local, torch.arange(flat.numel())):
        if tuple(counts) != out_shape:
            code.append((aten.reshape.default, (list(out_shape),)))
        return code
    forms: list[list[_Instr]] = []
    big = [d for d in range(len(counts)) if counts[d] > 1]
    perm = _find_permutation([counts[d] for d in big], local)
    if perm is not None:
        forms.append(_permute_code(counts, [big[i] for i in perm], out_shape))
    split = _split_permutation(local.reshape(out_shape), out_shape)
    if split is not None:
        sizes, order = split
        pre = [] if sizes == counts else [(aten.reshape.default, (sizes,))]
        forms.append(pre + _permute_code(sizes, order, out_shape))
    return code + min(forms, key=len) if forms else None


def _split_permutation(local: torch.Tensor, out_shape: tuple[int, ...]) -> tuple[list[int], list[int]] | None:
    """``(sizes, order)`` with ``arange(n).reshape(sizes).permute(...)`` equal to ``local``, where the
    source dims may first be split (e.g. channels C -> heads x head_dim), if the map is one.

    Each output dim advances the source by a fixed stride; sorted by stride they must tile the
    source contiguously. ``sizes`` are those dims in source order (leading 1s for the output's
    singleton dims), ``order`` the output's non-singleton dims as indices into ``sizes``.
    """
    dims = [j for j, size in enumerate(out_shape) if size > 1]
    flat = local.flatten()
    if flat[0] != 0:
        return None
    strides = {j: int(flat[math.prod(out_shape[j + 1:])]) for j in dims}
    rebuilt = torch.zeros(out_shape, dtype=flat.dtype)
    for j in dims:
        view = [1] * len(out_shape)
        view[j] = out_shape[j]
        rebuilt = rebuilt + torch.arange(out_shape[j]).reshape(view) * strides[j]
    if not torch.equal(rebuilt, local):
        return None
    memory = sorted(dims, key=lambda j: -strides[j])
    expected = 1
    for j in reversed(memory):
        if strides[j] != expected:
            return None
        expected *= out_shape[j]
    ones = len(out_shape) - len(dims)
    sizes = [1] * ones + [out_shape[j] for j in memory]
    return sizes, [ones + memory.index(j) for j in dims]


def _find_permutation(sizes: list[int], local: torch.Tensor) -> list[int] | None:
    """The ``p`` with ``arange(n).reshape(sizes).permute(p).flatten() == local``, if there is one.

    Read from the inside out: flat position 1 holds the stride of the innermost permuted dim, the
    position after a full run of it the stride of the next one, and so on; then check the whole map.
    """
    strides = [math.prod(sizes[i + 1:]) for i in range(len(sizes))]
    inner_first: list[int] = []
    pos = 1
    for _ in sizes:
        if pos >= local.numel():
            return None
        step = int(local[pos]) - int(local[0])
        dim = next((i for i, st in enumerate(strides) if st == step and i not in inner_first), None)
        if dim is None:
            return None
        inner_first.append(dim)
        pos *= sizes[dim]
    perm = inner_first[::-1]
    base = torch.arange(local.numel()).reshape(sizes) if sizes else torch.arange(local.numel())
    return perm if torch.equal(base.permute(perm).flatten(), local) else None


def _permute_code(counts: list[int], order: list[int], out_shape: tuple[int, ...]) -> list[_Instr]:
    """Permute the non-singleton dims into ``order``; singletons go where ``out_shape`` has 1s, else
    first (never last: a trailing singleton axis is padded to 64 bytes on the ANE)."""
    ones = [d for d in range(len(counts)) if counts[d] == 1]
    perm: list[int] | None = None
    if len(out_shape) == len(counts) and [s for s in out_shape if s != 1] == [counts[d] for d in order]:
        big_iter, one_iter = iter(order), iter(ones)
        perm = [next(big_iter) if s != 1 else next(one_iter) for s in out_shape]
    if perm is None:
        perm = ones + order
    moved = [i for i, d in enumerate(perm) if d != i]
    if not moved:
        code: list[_Instr] = []
    elif len(moved) == 2:
        code = [(aten.transpose.int, (moved[0], moved[1]))]
    else:
        code = [(aten.permute.default, (perm,))]
    if tuple(counts[d] for d in perm) != out_shape:
        code.append((aten.reshape.default, (list(out_shape),)))
    return code


@register_pass
class AneCancelTransposes(ViewRepairing, _PruningPass):
    """Cancel inverse layout changes: run element-wise regions in (B, C, 1, S), then shorten layout chains.

    Why: ``ane_linear_to_conv`` / ``ane_channel_layer_norm`` wrap every op in a (B, S, C) <-> (B, C, 1, S)
    change; the ANE layout pays off only if the tokens stay in (B, C, 1, S) between those ops
    (convert once after the patch embedding, keep the layout through all blocks; ml-ane-transformers'
    "Principle 3: Minimizing Memory Copies – avoid as many transposes and reshapes as possible").
    Two steps:
    1. a connected region of ops on (B, S, C) tensors that only need their axes renamed (unary
       activations; add/mul/... with a same-layout, scalar or constant operand; ``cat``/``slice``/
       ``split`` on the token or channel axis) is rebuilt on (B, C, 1, S) tensors when that removes
       more layout ops at its boundary than it adds (constants are re-laid out at export time) — so
       fc1 -> gelu -> fc2, the residual stream x + attn(x) + mlp(x) and the q/k/v split of a fused
       projection stay in BC1S. A token mean ``x.mean(1)`` (global average pooling) pools dim 3
       instead, and a reduction whose result is reshaped back to its keepdim shape keeps its dims;
    2. every chain of pure data-movement ops (transpose, permute, squeeze, unsqueeze, reshape,
       flatten, slice, select, split items) is replaced by its shortest equivalent form
       ``slice* -> [reshape] -> permute? -> reshape?`` (found by running the chain on an index
       tensor; the optional first reshape only splits dims, e.g. C -> heads x head_dim) when that has
       fewer ops: ``transpose(1,2).unsqueeze(2)`` after ``squeeze(2).transpose(1,2)`` becomes nothing.
       No intermediate has a higher rank than the chain's own ends. This runs on the graph as it is
       and on a copy where chain prefixes shared by several readers are duplicated per reader (then
       merged again where they stay identical); the result with fewer layout ops is kept.
    Exact: the same elements go through the same element-wise ops; only the layout moves
    (``torch.equal`` in the tests where the other ops are layout-independent; PyTorch's own CPU
    kernels may differ in the last bit on a contiguous vs strided input, e.g. GELU's vectorised erf
    or a conv's summation order).
    """

    name = "ane_cancel_transposes"
    exact = True
    fixes = ("transpose", "Transpose", "TRANSPOSE")

    def _run(self, ctx: PassContext) -> int:
        _erase_dead_dropouts(ctx)
        sites = 0
        for region in _regions(ctx):
            if _flip_gain(ctx, region) > 0:
                _flip(ctx, region)
                sites += 1
        for node in list(ctx.graph.nodes):  # mean over the tokens of from_bc1s(y): pool y directly
            if is_op(node, aten.mean) and node.args and (src := _from_source(ctx, node.args[0])) is not None \
                    and _token_mean(ctx, node, node.args[0]):
                with ctx.graph.inserting_before(node):
                    pooled = ctx.call(aten.mean.dim, src, [3], True)
                    ctx.replace(node, ctx.call(aten.reshape.default, pooled, list(ctx.shape(node))))
                sites += 1
        sites += _keepdim_reductions(ctx)
        if sites:
            ctx.graph.eliminate_dead_code()
            Aliasing.forget(ctx)  # the flipped regions' new views join the storage groups they read
        return sites + self._canonicalize_best(ctx)

    def _canonicalize_best(self, ctx: PassContext) -> int:
        """Canonicalise the chains as they are, and on a copy whose shared chain prefixes are first
        duplicated per reader (so q, k and v can each be read straight from the qkv conv); keep the
        graph with fewer layout ops."""
        trial = copy.copy(ctx)
        trial.graph = copy.deepcopy(ctx.graph)
        trial.graph.owning_module = ctx.gm  # for eliminate_dead_code's purity check of call_module
        _duplicate_shared_moves(trial.graph)
        trial_sites = self._canonicalize(trial)
        _merge_duplicate_moves(trial.graph)
        sites = self._canonicalize(ctx)
        if _layout_count(trial.graph) < _layout_count(ctx.graph):
            ctx.gm.graph = trial.graph
            ctx.graph = ctx.gm.graph
            return max(trial_sites, 1)  # merged duplicates alone are a rewrite too: the pipeline checks it
        return sites

    def _canonicalize(self, ctx: PassContext) -> int:
        sites = 0
        for _ in range(8):  # each rewrite strictly shortens its chain; a few sweeps reach the fixpoint
            done = 0
            for node in reversed(list(ctx.graph.nodes)):
                if node.graph is ctx.graph and node.users and self.matches(ctx, node):
                    with ctx.graph.inserting_before(node):
                        done += self.rewrite(ctx, node) is not False
            if not done:
                break
            sites += done
            ctx.graph.eliminate_dead_code()
        return sites

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        # Not in storage an in-place op writes: the rebuilt chain may copy where the chain viewed (or read
        # the source directly where it read a written intermediate), and the write would not reach it.
        return (_step(node) is not None and isinstance(ctx.val(node), torch.Tensor)
                and not Aliasing.of(ctx).written(node))

    def rewrite(self, ctx: PassContext, node: fx.Node) -> bool:
        best = self._best(ctx, node)
        if best is None:
            return False
        src, code = best
        out = src
        for op, args in code:
            out = ctx.call(op, out, *args)
        ctx.replace(node, out)
        return True

    @staticmethod
    def _best(ctx: PassContext, end: fx.Node) -> tuple[fx.Node, list[_Instr]] | None:
        """The source and canonical code saving the most ops over the chain ending at ``end``."""
        steps = _chain(end)
        best: tuple[int, fx.Node, list[_Instr]] | None = None
        removed, prev_dead = 0, True
        for k, step in enumerate(steps, start=1):
            # a step disappears with the chain end if everything after it did and it has no other user
            out_dies = prev_dead and (k == 1 or len(step.out.users) == 1)
            prev_dead = out_dies and step.private
            removed += step.cost if prev_dead else 0
            if removed <= (best[0] if best else 0):
                if not prev_dead:
                    break  # nothing further back can save more
                continue
            src, shape = step.src, ctx.shape(step.src)
            if k == 1 and shape != ctx.shape(end):
                continue  # one op is already the shortest form unless it is a no-op
            if shape is None or not shape or math.prod(shape) > _MAX_INDEX_NUMEL:
                continue
            with _single_thread():
                index = _try_run_steps(torch.arange(math.prod(shape), dtype=torch.int32).reshape(shape),
                                       steps[:k][::-1])
                code = None if index is None else _canonical(shape, index)
            if code is not None and removed - len(code) > (best[0] if best else 0):
                best = (removed - len(code), src, code)
        return None if best is None else (best[1], best[2])


def _keepdim_reductions(ctx: PassContext) -> int:
    """``mean(x, dims)`` whose only reader re-inserts the reduced dims (``reshape`` to the keepdim
    shape, e.g. pooled features into a (B, C, 1, 1) head conv) → ``mean(x, dims, keepdim=True)``."""
    sites = 0
    for node in list(ctx.graph.nodes):
        if not (is_op(node, aten.mean, aten.sum, aten.amax, aten.amin) and len(node.users) == 1
                and len(node.args) in (2, 3) and not node.kwargs and not (node.args[2:] and node.args[2])):
            continue
        (user,) = node.users
        src, dims = node.args[0], node.args[1]
        shape = ctx.shape(src)
        if shape is None or not isinstance(dims, (list, tuple)) or not is_op(user, aten.reshape, aten.view):
            continue
        kept = [1 if d in {x % len(shape) for x in dims} else n for d, n in enumerate(shape)]
        if ctx.shape(user) != tuple(kept):
            continue
        with ctx.graph.inserting_before(user):
            ctx.replace(user, ctx.call(node.target, src, dims, True))
        sites += 1
    return sites


def _is_move(node: fx.Node) -> bool:
    step = _step(node)
    return step is not None and node.target is not operator.getitem


def _layout_count(graph: fx.Graph) -> int:
    """Layout ops of a graph: data-movement ops and splits (their items are free)."""
    return sum(1 for n in graph.nodes if _is_move(n) or is_op(n, *_SPLITS))


def _duplicate_shared_moves(graph: fx.Graph) -> None:
    """Give every reader of a shared data-movement op its own copy (when all readers are data-movement
    ops too), so each chain can be canonicalised from its real source; copies left identical are
    merged again afterwards. Not where an in-place op writes the storage: a ``reshape`` may copy, and
    readers of two copies would no longer see each other's writes."""
    writes = Aliasing(graph)
    for node in reversed(list(graph.nodes)):
        users = list(node.users)
        if not _is_move(node) or len(users) < 2 or not all(_is_move(u) for u in users) or writes.written(node):
            continue
        for user in users[1:]:
            with graph.inserting_before(user):
                twin = graph.node_copy(node)
            user.replace_input_with(node, twin)


def _merge_duplicate_moves(graph: fx.Graph) -> None:
    """Common-subexpression elimination over data-movement ops and splits (all pure), except where an
    in-place op writes the storage (two ``reshape`` copies written apart must stay two tensors)."""
    writes = Aliasing(graph)
    seen: dict[tuple, fx.Node] = {}
    for node in list(graph.nodes):
        if not (_is_move(node) or is_op(node, *_SPLITS) or node.target is operator.getitem) or writes.written(node):
            continue
        key = (node.target, _freeze(node.args), _freeze(node.kwargs))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
        else:
            seen[key] = node


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_freeze(v) for v in value))
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def _erase_dead_dropouts(ctx: PassContext) -> None:
    """Erase inference-mode dropouts nobody reads: FX keeps them (``dropout`` is a seeded random op,
    so ``eliminate_dead_code`` treats it as impure) and they would keep layout changes alive."""
    for node in list(ctx.graph.nodes):
        if (is_op(node, aten.dropout, aten.feature_dropout, aten.alpha_dropout) and not node.users
                and len(node.args) > 2 and node.args[2] is False):
            ctx.graph.erase_node(node)


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Index bookkeeping on small int tensors: intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
