"""Rank lowering: data-movement chains through rank > 4 tensors rewritten at rank ≤ 4 (``lower_rank``).

Pure data movement, so every rewrite is exact. The rank lowering works from index maps: the chain
between a rank ≤ 4 tensor and a rank ≤ 4 result is replayed on ``arange`` (the flat index of every
source element), the result is read back as one strided view of the source, and that view is rebuilt
with reshapes, slices and rank ≤ 4 permutes (:func:`plan_low_rank`). The plan is replayed on the same
``arange`` and compared before any node is touched, so a site the planner cannot express is left
alone. The special cases that run before it (im2col/col2im, ``pixel_unshuffle``) are in ``layout.py``.
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from edgevit.export.passes import register_pass
from edgevit.export.passes.base import Aliasing, GraphPass, PassContext, aten, is_op

log = logging.getLogger(__name__)

MAX_RANK = 4


# --- rank lowering of data-movement chains ------------------------------------------------------------

# Ops that only re-index their first argument (one tensor in, one tensor out).
_VIEW_OPS = (aten.view, aten.reshape, aten._unsafe_view, aten.permute, aten.transpose, aten.swapaxes,
             aten.swapdims, aten.movedim, aten.mT, aten.unsqueeze, aten.squeeze, aten.select, aten.slice,
             aten.narrow, aten.flatten, aten.unflatten, aten.alias, aten.clone, aten.contiguous, aten.detach)
# Ops that re-index their first argument into a tuple, read through ``operator.getitem``.
_TUPLE_OPS = (aten.unbind, aten.split, aten.split_with_sizes, aten.chunk)

Op = tuple[Callable[..., Any], tuple[Any, ...]]  # (aten overload, arguments after the tensor)


def _is_view(node: Any) -> bool:
    if not is_op(node, *_VIEW_OPS):
        return False
    if is_op(node, aten.slice) and len(node.args) > 4 and node.args[4] != 1:
        return False  # strided slices are not plain re-indexing in every backend; leave them
    return all(not isinstance(a, fx.Node) for a in node.args[1:]) and not node.kwargs.keys() - {"memory_format"}


def _is_tuple_view(node: Any) -> bool:
    return is_op(node, *_TUPLE_OPS) and all(not isinstance(a, fx.Node) for a in node.args[1:])


def _is_item(node: Any) -> bool:
    """``getitem`` of an unbind/split/chunk."""
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
            and _is_tuple_view(node.args[0]))


def _data_input(node: fx.Node) -> Any:
    """The tensor a view node re-indexes (through the tuple op for a ``getitem``)."""
    return node.args[0].args[0] if _is_item(node) else node.args[0]


def _is_data_movement(node: Any) -> bool:
    return _is_view(node) or _is_tuple_view(node) or _is_item(node)


def _high(ctx: PassContext, node: Any, limit: int = MAX_RANK) -> bool:
    rank = ctx.rank(node)
    return rank is not None and rank > limit


def _chain(ctx: PassContext, end: fx.Node, limit: int) -> tuple[fx.Node, list[fx.Node]] | None:
    """Walk up from ``end`` through rank > ``limit`` data movement to the tensor the chain starts from.

    The start is the first tensor of rank ≤ ``limit`` or the first one a compute op (or an input)
    made. Returns (start, nodes from start to ``end`` in execution order), or None off the graph.
    """
    nodes: list[fx.Node] = []
    cur = end
    while True:
        nodes.append(cur)
        if _is_item(cur):
            nodes.append(cur.args[0])
        up = _data_input(cur)
        if not isinstance(up, fx.Node) or ctx.shape(up) is None:
            return None
        if not _high(ctx, up, limit) or not (_is_view(up) or _is_item(up)):
            return up, nodes[::-1]
        cur = up


def index_map(ctx: PassContext, source: fx.Node, nodes: list[fx.Node]) -> torch.Tensor:
    """Replay ``nodes`` on the flat index of every element of ``source`` (eagerly, on CPU)."""
    env: dict[fx.Node, Any] = {source: torch.arange(math.prod(ctx.shape(source))).reshape(ctx.shape(source))}
    for n in nodes:
        args = fx.node.map_arg(n.args, lambda a: env[a])
        env[n] = n.target(*args, **n.kwargs)
    return env[nodes[-1]]


def strided_form(indices: torch.Tensor) -> tuple[int, list[tuple[int, int]]] | None:
    """Read an index map as one strided view: (offset, [(size, stride), ...] outermost first).

    Sizes are factors of the flattened output (runs of constant stride are merged greedily), so the
    view reshaped to the output shape is the map; None when the map is not a strided view.
    """
    flat = indices.reshape(-1)
    if flat.numel() == 0:
        return None
    offset, dims = int(flat[0]), []
    while flat.numel() > 1:
        found = _innermost_run(flat)
        if found is None:
            return None
        size, stride = found
        dims.append((size, stride))
        flat = flat.reshape(-1, size)[:, 0]
    return offset, dims[::-1]


def _innermost_run(flat: torch.Tensor) -> tuple[int, int] | None:
    """The largest f dividing len(flat) such that every block of f is a run with one positive stride."""
    n = flat.numel()
    diffs = flat[1:] - flat[:-1]
    stride = int(diffs[0])
    if stride <= 0:
        return None  # broadcast (stride 0) or reversed data: not a plain re-indexing of the source
    breaks = (diffs != stride).nonzero()
    longest = int(breaks[0]) + 1 if breaks.numel() else n
    for f in range(min(longest, n), 1, -1):
        if n % f == 0:
            blocks = flat.reshape(-1, f)
            if torch.equal(blocks - blocks[:, :1], stride * torch.arange(f).expand_as(blocks)):
                return f, stride
    return None


def plan_low_rank(source_shape: Sequence[int], indices: torch.Tensor, max_rank: int = MAX_RANK,
                  max_steps: int = 3) -> list[Op] | None:
    """Ops rebuilding ``indices`` from a ``source_shape`` tensor with every intermediate of rank ≤ ``max_rank``.

    The view is: reshape the source into its axes (one per view dim, in memory order), slice the
    axes the view does not fully cover, then reorder the axes into view order by a few
    "reshape into ≤ max_rank blocks + permute the blocks" steps (a breadth-first search, so as few
    as possible), and reshape to the output shape.
    """
    form = strided_form(indices)
    if form is None:
        return None
    offset, dims = form
    layout = _axes(math.prod(source_shape), offset, dims)
    if layout is None:
        return None
    extents, starts, by_stride = layout
    ops: list[Op] = []
    lengths = [dims[i][0] for i in by_stride] + [1] * (len(extents) - len(by_stride))
    if not _slice_ops(extents, starts, lengths, max_rank, ops):
        return None
    units, unit_sizes = _fuse_units(by_stride, [d[0] for d in dims])
    steps = _permute_steps(units, max_rank, max_steps)
    if steps is None:
        return None
    for cuts, perm in steps:
        state_sizes = [math.prod(unit_sizes[u] for u in block) for block in cuts]
        ops.append((aten.reshape.default, (state_sizes,)))
        ops.append((aten.permute.default, (list(perm),)))
    ops.append((aten.reshape.default, (list(indices.shape),)))
    return _simplify(list(source_shape), ops)


def _axes(numel: int, offset: int, dims: list[tuple[int, int]]) -> tuple[list[int], list[int], list[int]] | None:
    """Source axes for a strided view: (extents, start of the view on each axis, view dims by stride).

    The source, reshaped to ``extents``, has one axis per view dim (largest stride first) plus, when
    the smallest stride is not 1, an innermost axis of which the view reads one index.
    """
    by_stride = sorted(range(len(dims)), key=lambda i: -dims[i][1])
    strides = [dims[i][1] for i in by_stride]
    if len(set(strides)) < len(strides):
        return None  # two dims with one stride overlap: not a re-indexing
    if strides and strides[-1] != 1:
        strides.append(1)
    if not strides:
        strides = [1]
    outer = [numel] + strides[:-1]
    if any(o % s for o, s in zip(outer, strides)):
        return None
    extents = [o // s for o, s in zip(outer, strides)]
    starts = [(offset // s) % e for s, e in zip(strides, extents)]
    if sum(st * s for st, s in zip(starts, strides)) != offset:
        return None
    return extents, starts, by_stride


def _slice_ops(extents: list[int], starts: list[int], lengths: list[int], max_rank: int, ops: list[Op]) -> bool:
    """Append reshape + slices selecting ``lengths`` from ``starts`` on each axis (False: too many dims).

    Axes are grouped into as few reshape dims as possible: an axis starts a new dim when it is
    sliced (a slice of a merged dim must be on its outermost axis with the rest taken whole).
    """
    groups: list[list[int]] = []
    for a in range(len(extents)):
        whole = starts[a] == 0 and lengths[a] == extents[a]
        if not groups or not whole:
            groups.append([a])
        else:
            groups[-1].append(a)
    if len(groups) > max_rank:
        return False
    ops.append((aten.reshape.default, ([math.prod(extents[a] for a in g) for g in groups],)))
    for dim, g in enumerate(groups):
        inner = math.prod(extents[a] for a in g[1:])
        first = g[0]
        if starts[first] != 0 or lengths[first] != extents[first]:
            ops.append((aten.slice.Tensor, (dim, starts[first] * inner, (starts[first] + lengths[first]) * inner)))
    return True


def _fuse_units(by_stride: list[int], sizes: list[int]) -> tuple[list[int], list[int]]:
    """Merge view dims adjacent both in memory and in view order (after slicing they are one axis).

    Returns the memory order as unit ids (numbered in view order) and each unit's size.
    """
    groups: list[list[int]] = []
    for d in by_stride:
        if groups and groups[-1][-1] + 1 == d:
            groups[-1].append(d)
        else:
            groups.append([d])
    in_view_order = sorted(range(len(groups)), key=lambda g: groups[g][0])
    unit_of = {g: u for u, g in enumerate(in_view_order)}
    units = [unit_of[g] for g in range(len(groups))]
    unit_sizes = [math.prod(sizes[d] for d in groups[g]) for g in in_view_order]
    return units, unit_sizes


Step = tuple[list[list[int]], tuple[int, ...]]  # (blocks of the current axis order, permutation of the blocks)


def _permute_steps(start: list[int], max_rank: int, max_steps: int) -> list[Step] | None:
    """Fewest "cut into ≤ max_rank blocks, permute the blocks" steps turning ``start`` into 0, 1, ..., n-1."""
    goal = tuple(sorted(start))
    first = tuple(start)
    if first == goal:
        return []
    if len(first) > 6:
        return None  # 7! orders take seconds to search; such chains do not occur in practice
    parents: dict[tuple[int, ...], tuple[tuple[int, ...], list[list[int]], tuple[int, ...]] | None] = {first: None}
    frontier = deque([(first, 0)])
    while frontier:
        state, depth = frontier.popleft()
        if depth == max_steps:
            continue
        for blocks in _cuts(state, max_rank):
            for perm in itertools.permutations(range(len(blocks))):
                nxt = tuple(u for p in perm for u in blocks[p])
                if nxt in parents:
                    continue
                parents[nxt] = (state, blocks, perm)
                if nxt == goal:
                    return _unwind(parents, nxt)
                frontier.append((nxt, depth + 1))
    return None


def _cuts(state: tuple[int, ...], max_rank: int) -> list[list[list[int]]]:
    """Every split of ``state`` into 2..max_rank contiguous blocks, fewest blocks first."""
    n = len(state)
    out = []
    for k in range(1, min(max_rank, n)):
        for pos in itertools.combinations(range(1, n), k):
            edges = (0, *pos, n)
            out.append([list(state[a:b]) for a, b in itertools.pairwise(edges)])
    return out


def _unwind(parents: dict, state: tuple[int, ...]) -> list[Step]:
    steps = []
    while parents[state] is not None:
        prev, blocks, perm = parents[state]
        steps.append((blocks, perm))
        state = prev
    return steps[::-1]


def _simplify(source_shape: list[int], ops: list[Op]) -> list[Op]:
    """Drop reshapes to the current shape and reshapes followed by another reshape."""
    out: list[Op] = []
    shape = list(source_shape)
    for op, args in ops:
        if op is aten.reshape.default:
            if out and out[-1][0] is aten.reshape.default:
                out.pop()
                shape = _shape_after(source_shape, out)
            if list(args[0]) == shape:
                continue
        out.append((op, args))
        shape = _shape_after(source_shape, out)
    return out


def _shape_after(source_shape: list[int], ops: list[Op]) -> list[int]:
    t = torch.empty(source_shape, device="meta")
    for op, args in ops:
        t = op(t, *args)
    return list(t.shape)


def replay(ops: list[Op], source: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Apply ``ops`` to ``source`` eagerly; returns the result and the largest rank on the way."""
    top = source.dim()
    for op, args in ops:
        source = op(source, *args)
        top = max(top, source.dim())
    return source, top


def high_rank_compute(ctx: PassContext) -> list[str]:
    """Compute ops (and graph outputs) that take a rank > 4 tensor: reported, not rewritten."""
    notes = []
    for node in ctx.graph.nodes:
        if node.op not in ("call_function", "output") or _is_data_movement(node):
            continue
        for arg in node.all_input_nodes:
            if _high(ctx, arg):
                what = "graph output" if node.op == "output" else f"{node.name} ({node.target})"
                notes.append(f"{what} takes the rank-{ctx.rank(arg)} tensor {arg.name}")
    return notes


@register_pass
class LowerRank(GraphPass):
    """Chains of reshape/permute/split/unbind/... through rank > 4 tensors → rank ≤ 4 chains.

    Why: Core ML rejects rank > 5 ("Core ML only supports tensors with rank <= 5"; coremltools 9 only
    repairs reshape→transpose→reshape itself, not rank-6 chains that end in unbind/select/split or
    feed two consumers), litert-torch keeps rank 5/6 tensors that the TFLite GPU delegate ("bad
    input dims size: 5") and NNAPI (rank ≤ 4) refuse, and the ORT Core ML EP rejects rank > 5
    Reshape/Transpose. Typical sources: timm's fused QKV
    ``reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)``, Swin/EfficientViT rank-6 window
    partition/reverse, einops-style patchify at rank 6, MobileViT unfolding.
    How: each result of such a chain (a tensor a compute op or the output reads) is a strided view
    of the tensor the chain starts from; it is rebuilt as reshape + slices + permutes of rank ≤ 4
    (verified on an index map before the graph changes; a site with no such form is left alone).
    Where an end or the start itself has rank 5 (a rank-6 QKV whose q/k/v stay rank 5), the
    intermediates are lowered to rank 5, which is what Core ML needs. Rank > 4 tensors feeding
    compute ops are listed in ``notes`` and logged, not rewritten. Exact (pure data movement).
    A chain whose source or result an in-place op writes is left alone: the rebuilt chain may copy
    where the original viewed, or view where a ``clone`` in it copied, and the write would reach
    other tensors than before.
    """

    name = "lower_rank"
    fixes = ("rank>4", "rank>5")

    def __init__(self) -> None:
        self.notes: list[str] = []
        self._made: dict[tuple, fx.Node] = {}

    def run(self, ctx: PassContext) -> int:
        self._made = {}
        sites = super().run(ctx)
        self.notes = high_rank_compute(ctx)
        for note in self.notes:
            log.info("lower_rank left alone: %s", note)
        return sites

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        """A data-movement result read straight from a tensor of higher rank than it and than 4."""
        if not (_is_view(node) or _is_item(node)) or ctx.shape(node) is None:
            return False
        if _high(ctx, node) and all(_is_data_movement(u) for u in node.users):
            return False  # a rank > 4 link of a longer chain: its ends are the sites
        return _high(ctx, _data_input(node), max(MAX_RANK, ctx.rank(node)))

    def rewrite(self, ctx: PassContext, node: fx.Node) -> bool | None:
        # Lower to rank 4 where the ends allow it; a rank-5 end (or start) still gets its rank-6
        # intermediates removed, which is what Core ML needs.
        found = _chain(ctx, node, max(MAX_RANK, ctx.rank(node)))
        if found is None:
            return False
        source, nodes = found
        writes = Aliasing.of(ctx)
        if writes.written(source) or writes.written(node):
            return False  # the rebuilt chain may copy where it viewed (or view where a clone copied)
        limit = max(MAX_RANK, ctx.rank(node), ctx.rank(source))
        if max(ctx.rank(n) or 0 for n in nodes) <= limit:
            return False  # nothing above the ends' rank: no gain
        indices = index_map(ctx, source, nodes)
        ops = plan_low_rank(ctx.shape(source), indices, limit)
        if ops is None:
            return False
        src_index = torch.arange(math.prod(ctx.shape(source))).reshape(ctx.shape(source))
        rebuilt, top = replay(ops, src_index)
        if top > limit or not torch.equal(rebuilt, indices):
            return False
        ctx.replace(node, self._emit(ctx, source, ops))

    def _emit(self, ctx: PassContext, source: fx.Node, ops: list[Op]) -> fx.Node:
        """Insert ``ops`` after ``source``, sharing nodes already made for the same prefix (q, k, v)."""
        cur = source
        for op, args in ops:
            key = (cur, op, repr(args))
            if key not in self._made:
                self._made[key] = ctx.call(op, cur, *args)
            cur = self._made[key]
        return cur
