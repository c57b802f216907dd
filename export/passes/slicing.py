"""Slice sinking: compute only the rows a graph keeps (dead-row elimination).

A class-token classifier reads one token of the last block's output (``x[:, 0]``, a ``slice`` after
``select_to_slice``), yet a captured graph computes the whole last block -- its output projection, MLP,
both LayerNorms and every attention query -- for all N tokens. PyTorch eager, ONNX, TFLite and OpenVINO
all run those rows and throw them away (DeiT-Tiny: ~80 M of its 1.26 G MACs). Moving the slice above
each op that works row by row makes that op compute only the kept rows; the slice stops at the first op
whose other users still need every row (the ``qkv`` projection, whose keys and values all tokens feed).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

from torch import fx

from edgevit.export.passes import register_pass
from edgevit.export.passes.base import GraphPass, PassContext, aten, is_op, slice_bounds, split_chunk

# Ops applied element by element with broadcasting: a slice commutes with them.
_ELEMENTWISE = (aten.add, aten.sub, aten.mul, aten.div, aten.pow, aten.gelu, aten.relu, aten.silu,
                aten.sigmoid, aten.tanh, aten.hardswish, aten.hardsigmoid, aten.neg, aten.exp, aten.erf,
                aten.abs, aten.sqrt, aten.rsqrt, aten.clamp, aten.leaky_relu, aten.elu, aten.reciprocal)
_RESHAPES = (aten.reshape, aten.view, aten._unsafe_view)
_SOFTMAXES = (aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax)
_REDUCTIONS = (aten.mean, aten.sum, aten.amax, aten.amin)
_MATMULS = (aten.matmul, aten.bmm, aten.mm)


class _Cut:
    """A slice of one dim of a node's output, its bounds normalised as Python's ``slice.indices``."""

    def __init__(self, ctx: PassContext, node: fx.Node) -> None:
        self.dim, self.start, self.end, self.step = slice_bounds(ctx, node)
        self.rank = ctx.rank(node.args[0])
        self.size = ctx.shape(node.args[0])[self.dim]
        self.length = len(range(self.start, self.end, self.step))

    def key(self) -> tuple[int, int, int, int]:
        return self.dim, self.start, self.end, self.step

    def apply(self, ctx: PassContext, node: Any, dim: int) -> Any:
        """``node`` cut the same way along its ``dim`` (a no-op for non-nodes)."""
        if not isinstance(node, fx.Node):
            return node
        return ctx.call(aten.slice.Tensor, node, dim, self.start, self.end, self.step)


def _is_slice(ctx: PassContext, node: fx.Node) -> bool:
    return is_op(node, aten.slice) and isinstance(node.args[0], fx.Node) and ctx.shape(node.args[0]) is not None


def _broadcast_operand(ctx: PassContext, cut: _Cut, operand: Any) -> Any:
    """An elementwise operand cut where it spans the sliced dim; kept whole where it broadcasts."""
    shape = ctx.shape(operand) if isinstance(operand, fx.Node) else None
    if shape is None:
        return operand
    aligned = cut.dim - (cut.rank - len(shape))
    if aligned < 0 or shape[aligned] == 1:
        return operand
    return cut.apply(ctx, operand, aligned) if shape[aligned] == cut.size else None


def _sink_elementwise(ctx: PassContext, node: fx.Node, cut: _Cut) -> fx.Node | None:
    args = [_broadcast_operand(ctx, cut, a) for a in node.args]
    if any(new is None and old is not None for new, old in zip(args, node.args)):
        return None
    return ctx.call(node.target, *args, **node.kwargs)


def _sink_rowwise(ctx: PassContext, node: fx.Node, cut: _Cut) -> fx.Node | None:
    """linear / layer_norm / softmax: each output row depends only on the same input row."""
    if is_op(node, aten.linear):
        free = cut.dim < cut.rank - 1
    elif is_op(node, aten.layer_norm):
        free = cut.dim < cut.rank - len(node.args[1])
    else:
        free = cut.dim != node.args[1] % cut.rank
    if not free:
        return None
    return ctx.call(node.target, cut.apply(ctx, node.args[0], cut.dim), *node.args[1:], **node.kwargs)


def _sink_transpose(ctx: PassContext, node: fx.Node, cut: _Cut) -> fx.Node | None:
    if is_op(node, aten.transpose):
        a, b = node.args[1] % cut.rank, node.args[2] % cut.rank
        source = {a: b, b: a}.get(cut.dim, cut.dim)
    else:
        source = node.args[1][cut.dim] % cut.rank
    return ctx.call(node.target, cut.apply(ctx, node.args[0], source), *node.args[1:], **node.kwargs)


def _sink_reshape(ctx: PassContext, node: fx.Node, cut: _Cut) -> fx.Node | None:
    """A reshape commutes when the cut dim survives it: same size, same number of elements before it."""
    src, out = ctx.shape(node.args[0]), ctx.shape(node)
    before = math.prod(out[: cut.dim])
    source = next((d for d in range(len(src)) if src[d] == cut.size and math.prod(src[:d]) == before), None)
    if source is None:
        return None
    shape = list(out)
    shape[cut.dim] = cut.length
    return ctx.call(node.target, cut.apply(ctx, node.args[0], source), shape)


def _sink_reduction(ctx: PassContext, node: fx.Node, cut: _Cut) -> fx.Node | None:
    src = ctx.shape(node.args[0])
    if len(node.args) < 2 or not isinstance(node.args[1], (list, tuple)) or src is None:
        return None
    if not node.args[1]:
        return None  # an empty dim list reduces every dim
    reduced = {d % len(src) for d in node.args[1]}
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    kept = list(range(len(src))) if keepdim else [d for d in range(len(src)) if d not in reduced]
    source = kept[cut.dim]
    if source in reduced:
        return None
    return ctx.call(node.target, cut.apply(ctx, node.args[0], source), *node.args[1:], **node.kwargs)


def _sink_matmul(ctx: PassContext, node: fx.Node, cut: _Cut) -> fx.Node | None:
    """Rows come from the left operand, columns from the right, batch dims from both (broadcast)."""
    a, b = node.args[0], node.args[1]
    sa, sb = ctx.shape(a), ctx.shape(b)
    if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
        return None
    if cut.dim == cut.rank - 2:
        return ctx.call(node.target, cut.apply(ctx, a, len(sa) - 2), b)
    if cut.dim == cut.rank - 1:
        return ctx.call(node.target, a, cut.apply(ctx, b, len(sb) - 1))
    new_a, new_b = _broadcast_operand(ctx, cut, a), _broadcast_operand(ctx, cut, b)
    if new_a is None or new_b is None:
        return None
    return ctx.call(node.target, new_a, new_b)


def _sink_cat(ctx: PassContext, node: fx.Node, cut: _Cut) -> fx.Node | None:
    cat_dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % cut.rank
    if cat_dim == cut.dim:
        return None
    parts = [cut.apply(ctx, t, cut.dim) for t in node.args[0]]
    return ctx.call(node.target, parts, cat_dim)


def _sink_other_slice(ctx: PassContext, node: fx.Node, cut: _Cut) -> fx.Node | None:
    """slice(slice(x, d2), d) -> slice(slice(x, d), d2) for d2 != d, so the cut can travel on to x."""
    inner = _Cut(ctx, node)
    if inner.dim == cut.dim:
        return None
    return ctx.call(aten.slice.Tensor, cut.apply(ctx, node.args[0], cut.dim), inner.dim, inner.start,
                    inner.end, inner.step)


def _sink_split_item(ctx: PassContext, node: fx.Node, cut: _Cut) -> fx.Node | None:
    """getitem(split(x, sizes, d2), i) is slice(x, d2, start_i, end_i): cut that instead."""
    chunk = split_chunk(ctx, node)
    if chunk is None or chunk[1] == cut.dim:
        return None
    source, split_dim, start, end = chunk
    return ctx.call(aten.slice.Tensor, cut.apply(ctx, source, cut.dim), split_dim, start, end)


_SINKS: tuple[tuple[tuple[Any, ...], Callable[[PassContext, fx.Node, _Cut], fx.Node | None]], ...] = (
    (_ELEMENTWISE, _sink_elementwise),
    ((aten.linear, aten.layer_norm) + _SOFTMAXES, _sink_rowwise),
    ((aten.transpose, aten.permute), _sink_transpose),
    (_RESHAPES, _sink_reshape),
    (_REDUCTIONS, _sink_reduction),
    (_MATMULS, _sink_matmul),
    ((aten.cat,), _sink_cat),
    ((aten.slice,), _sink_other_slice),
)


@register_pass
class SinkSlices(GraphPass):
    """Move a slice above the row-wise ops that feed it, so they compute only the rows it keeps.

    What: ``slice(op(x), d)`` → ``op(slice(x, d'))`` for elementwise ops (operands that broadcast over
    ``d`` stay whole), ``linear``/``layer_norm``/``softmax`` over other dims, transposes, permutes and
    reshapes that keep ``d`` (renumbered), reductions over other dims, ``matmul`` (rows from the left
    operand, columns from the right), ``cat`` and ``split`` on other dims; repeated until the slice
    reaches an op that others need whole. Slices that meet at an op with several users are merged first.
    Why: a class-token model reads one row of its last block and every backend computes all N rows
    anyway; for DeiT-Tiny the last block then runs its MLP, projection and attention for one query.
    Exact: every kept element is computed by the same operations on the same values.
    """

    name = "sink_slices"

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        return _is_slice(ctx, node)

    def run(self, ctx: PassContext) -> int:
        sites = 0
        work = [n for n in ctx.graph.nodes if _is_slice(ctx, n)]
        budget = 8 * len(ctx.graph.nodes)  # each step moves a cut one op up; this bounds any cycle
        while work and budget:
            node = work.pop()
            if _is_erased(node) or not self.matches(ctx, node):
                continue
            budget -= 1
            moved = self._sink(ctx, node)
            if moved is not None:
                sites += 1
                work.extend(n for n in moved.all_input_nodes if _is_slice(ctx, n))
        return sites

    def _sink(self, ctx: PassContext, node: fx.Node) -> fx.Node | None:
        """One step: rewrite a slice as its producer applied to cut inputs; None if it cannot move."""
        cut = _Cut(ctx, node)
        producer = node.args[0]
        if cut.length == cut.size or producer.op != "call_function":
            return None
        node = _sole_reader(ctx, producer, node, cut)
        if node is None:
            return None
        before = set(ctx.graph.nodes)
        # At the producer, not at the slice: the producer's inputs are read when the producer ran, and an
        # in-place op between the two (``y = h * 2; h.add_(1); y[:, :1]``) must not reach the new reads.
        with ctx.graph.inserting_before(producer):
            if producer.target is operator.getitem:
                moved = _sink_split_item(ctx, producer, cut)
            else:
                handler = next((h for ops, h in _SINKS if is_op(producer, *ops)), None)
                moved = handler(ctx, producer, cut) if handler else None
        if moved is None or ctx.shape(moved) != ctx.shape(node):
            for extra in reversed([n for n in ctx.graph.nodes if n not in before]):
                ctx.graph.erase_node(extra)  # a half-built sink: its cut inputs are orphans
            return None
        ctx.replace(node, moved)
        ctx.graph.erase_node(node)
        _erase_unused(ctx, producer)
        return moved


def _sole_reader(ctx: PassContext, producer: fx.Node, node: fx.Node, cut: _Cut) -> fx.Node | None:
    """The slice to move when it is ``producer``'s only reader, after merging users that are the same
    slice into the first of them in graph order (so all their readers still come after it)."""
    users = list(producer.users)
    if users == [node]:
        return node
    if not all(_is_slice(ctx, u) and u.args[0] is producer and _Cut(ctx, u).key() == cut.key() for u in users):
        return None
    position = {n: i for i, n in enumerate(ctx.graph.nodes)}
    first = min(users, key=position.__getitem__)
    for other in users:
        if other is not first:
            ctx.replace(other, first)
            ctx.graph.erase_node(other)
    return first


def _is_erased(node: fx.Node) -> bool:
    return getattr(node, "_erased", False)


def _erase_unused(ctx: PassContext, node: Any) -> None:
    """Remove ``node`` if nothing reads it, then each of its inputs that only it read."""
    stack = [node]
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n.users or n.op != "call_function" or _is_erased(n):
            continue
        inputs = n.all_input_nodes
        ctx.graph.erase_node(n)
        stack.extend(inputs)
