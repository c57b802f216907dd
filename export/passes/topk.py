"""``static_topk_select``: ``topk`` whose indices feed gather / scatter / index_select as a rank-based
one-hot selection (MatMuls).

Why it exists (the op lists of onnxruntime's NNAPI and Core ML EPs, gather on the ANE, and the ops
both EPs take) is the docstring of ``selection.py``, whose ``static_gather_scatter`` handles the same
consumers when the indices are constants; the index views that carry the top-k indices to their
consumers are shared with it.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx

from edgevit.export.passes import register_pass
from edgevit.export.passes.base import GraphPass, PassContext, aten, is_op
from edgevit.export.passes.selection import _INDEX_VIEWS

_GAIN = 2.0 ** 15  # the largest power of two below the fp16 maximum (65504): a safe constant in fp16
_GAIN_STEPS = 3  # pairwise score differences are scaled by _GAIN ** _GAIN_STEPS = 2 ** 45
_DIGIT = 64  # index digit base for the fp16-exact tie-break when N > 1024


@dataclass
class _Use:
    """One consumer of the top-k indices, rewritten from the one-hot selection P (Bp, K, N)."""

    node: fx.Node
    kind: str  # gather | scatter | take (index_select / x[idx]) | values
    x: Any = None
    layout: str = ""  # gather/scatter: "last" (x (B.., C.., N)) or "first" (x (B.., N, C..)); take: "first"/"last"
    src: Any = None


@dataclass
class _TopkPlan:
    scores: fx.Node
    n: int
    k: int
    batch: int  # Bp, the product of the batch dims of the scores
    largest: bool
    uses: list[_Use] = field(default_factory=list)


def _position_map(node: fx.Node, pos: torch.Tensor) -> torch.Tensor | None:
    """Apply the data-movement op ``node`` to the position tensor ``pos`` of its first input."""
    if any(isinstance(a, fx.Node) for a in node.args[1:]) or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
        return None
    try:
        return node.target(pos, *node.args[1:], **node.kwargs)
    except Exception:  # an op whose arguments we misread: treat the site as unknown
        return None


def _expected_gather_map(shape: tuple[int, ...], nb: int, dim: int, index_shape: tuple[int, ...]) -> torch.Tensor:
    """The position map of ``I[b.., k]`` broadcast to ``shape``: b.. from the leading nb dims, k from ``dim``."""
    base = torch.arange(math.prod(index_shape)).reshape(index_shape)
    grids = torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij")
    return base[tuple(grids[:nb]) + (grids[dim],)]


@register_pass
class StaticTopkSelect(GraphPass):
    """``topk`` whose indices feed gather / scatter / index_select → a rank-based one-hot selection (MatMuls).

    Why: ONNX ``TopK``, ``GatherElements``, ``ScatterElements`` (and the ``Expand`` of the indices) are in
    neither the NNAPI nor the Core ML (MLProgram) EP op list; FilterViT picks its K
    pixels with ``topk`` -> ``gather`` -> transformer -> ``scatter``, so each selection block splits the
    graph into several partitions. Here the K winners are found by counting, with EP-supported ops only:

        E[j, i] = (s_j - s_i) * 2^45 + 2(i - j) - 1     (2^45 applied as three x2^15, fp16-safe constants)
        A[j, i] = clip(E, -1, 1) * 0.5 + 0.5            = 1 iff j ranks ahead of i (ties: lower index first)
        rank_i  = Σ_j A[j, i]                           (MatMul with a ones row)
        P[k, i] = relu(1 - (rank_i - k)^2)              = 1 iff rank_i == k
        values = P @ s, gather = P @ x (or x @ Pᵀ), scatter = x * (1 - Σ_k P[k, :]) + Pᵀ @ src

    matching ``torch.topk(s, K, -1, largest, sorted=True)`` (descending for largest). The index term
    is formed from two digits (base 64) when N > 1024, so it stays exact in fp16.
    Supported consumers (reached through unsqueeze/expand/reshape/... of the indices, proven with a
    position map): ``gather``/``scatter`` (src or value) along the top-k axis with the indices broadcast
    over the other dims, ``index_select``/``x[idx]`` on the flattened indices, and the values; a topk
    with any other use, ``sorted=False`` or a dim other than the last is left alone.

    Exact (torch.equal in fp32) when the scores have no ties and no two scores closer than
    (2N+1)·2^-45 (≈1.7e-10 at N=3025); closer or tied scores are ordered by index, which is a valid
    top-k but may differ from PyTorch's arbitrary tie order. x/src must be finite (0 * inf = NaN).
    fp16: the comparisons stay exact (every non-zero fp16 difference x 2^45 overflows to ±inf, clipped
    to ±1; ties use the exact digit tie-break), ranks are exact up to 2048, so K ≤ 2048 is required.
    Cost (per image): 9 (N ≤ 1024) or 11 elementwise ops on an N x N tensor plus N^2 MACs for the ranks (N=3025:
    9.2 M elements = 36.6 MB fp32 per live N x N buffer), four ops on K x N, and K*N*C MACs per
    gather/scatter (N=3025, K=256, C=64: 49.6 M MACs each).
    """

    name = "static_topk_select"
    exact = True
    fixes = ("TopK", "topk", "TOPK_V2", "GatherElements", "ScatterElements", "gather_along_axis",
             "scatter_along_axis")

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        return is_op(node, aten.topk) and ctx.shape(node.args[0]) is not None

    def rewrite(self, ctx: PassContext, node: fx.Node) -> bool | None:
        plan = self._plan(ctx, node)
        if plan is None:
            return False
        builder = _Selection(ctx, plan, node)
        for use in plan.uses:
            with ctx.graph.inserting_before(use.node):
                ctx.replace(use.node, builder.emit(use))
        return None

    # --- analysis --------------------------------------------------------------------------------
    def _plan(self, ctx: PassContext, node: fx.Node) -> _TopkPlan | None:
        args = list(node.args) + [None] * (5 - len(node.args))
        scores, k = args[0], args[1]
        dim = node.kwargs.get("dim", -1 if args[2] is None else args[2])
        largest = node.kwargs.get("largest", True if args[3] is None else args[3])
        is_sorted = node.kwargs.get("sorted", True if args[4] is None else args[4])
        shape = ctx.shape(scores)
        if not shape or not is_sorted or dim % len(shape) != len(shape) - 1:
            return None
        if ctx.val(scores).dtype not in (torch.float32, torch.float16) or not isinstance(k, int):
            return None
        n = shape[-1]
        if not 0 < k <= n or k > 2048:  # ranks are exact in fp16 up to 2048
            return None
        plan = _TopkPlan(scores, n, k, math.prod(shape[:-1]), bool(largest))
        index_shape = (*shape[:-1], k)
        for user in node.users:
            if user.op != "call_function" or user.target is not operator.getitem:
                return None
            if user.args[1] == 0:
                if user.users:
                    plan.uses.append(_Use(user, "values"))
            elif not self._index_uses(ctx, plan, user, index_shape):
                return None
        return plan

    def _index_uses(self, ctx: PassContext, plan: _TopkPlan, indices: fx.Node, ishape: tuple[int, ...]) -> bool:
        """Walk the index chain from ``indices``; False if any use is not a supported consumer."""
        maps = {indices: torch.arange(math.prod(ishape)).reshape(ishape)}
        todo = [indices]
        while todo:
            j = todo.pop()
            for user in j.users:
                if user.op == "call_function" and is_op(user, *_INDEX_VIEWS) and user.args[0] is j:
                    pos = _position_map(user, maps[j])
                    if pos is None:
                        return False
                    maps[user] = pos
                    todo.append(user)
                    continue
                use = self._consumer(ctx, plan, user, j, maps[j], ishape)
                if use is None:
                    return False
                plan.uses.append(use)
        return True

    @staticmethod
    def _consumer(ctx: PassContext, plan: _TopkPlan, user: fx.Node, j: fx.Node, pos: torch.Tensor,
                  ishape: tuple[int, ...]) -> _Use | None:
        nb = len(ishape) - 1
        if is_op(user, aten.gather, aten.scatter) and user.args[2] is j and j not in user.args[:2]:
            x, xs = user.args[0], ctx.shape(user.args[0])
            if xs is None or ctx.val(x).dtype != ctx.val(plan.scores).dtype or len(xs) != pos.dim():
                return None
            if user.kwargs.get("reduce") is not None or user.kwargs.get("sparse_grad") or len(user.args) > 4:
                return None
            dim = user.args[1] % len(xs)
            if dim < nb or xs[dim] != plan.n or tuple(pos.shape[:nb]) != ishape[:nb]:
                return None
            if any(pos.shape[i] != xs[i] for i in range(len(xs)) if i != dim) or pos.shape[dim] != plan.k:
                return None
            if not torch.equal(pos, _expected_gather_map(tuple(pos.shape), nb, dim, ishape)):
                return None
            layout = "last" if dim == len(xs) - 1 else "first" if dim == nb else ""
            if not layout:
                return None
            if is_op(user, aten.gather):
                return _Use(user, "gather", x, layout)
            src = user.args[3]
            if isinstance(src, fx.Node) and (src is j or ctx.shape(src) != tuple(pos.shape)
                                             or ctx.val(src).dtype != ctx.val(x).dtype):
                return None
            return _Use(user, "scatter", x, layout, src)
        take = StaticTopkSelect._take_dim(ctx, user, j)
        if take is None:
            return None
        x, dim = take
        xs = ctx.shape(x)
        if not torch.equal(pos.reshape(-1), torch.arange(pos.numel())) or xs[dim] != plan.n:
            return None
        if ctx.val(x).dtype != ctx.val(plan.scores).dtype:
            return None
        if dim == 0:
            return _Use(user, "take", x, "first")
        if dim == len(xs) - 1 and plan.batch == 1 and pos.dim() == 1:
            return _Use(user, "take", x, "last")
        return None

    @staticmethod
    def _take_dim(ctx: PassContext, user: fx.Node, j: fx.Node) -> tuple[fx.Node, int] | None:
        """(x, dim) for ``index_select(x, dim, j)`` (j 1-D) or ``x[.., j, ..]`` with j the only index."""
        if is_op(user, aten.index_select) and user.args[2] is j and user.args[0] is not j:
            xs = ctx.shape(user.args[0])
            return (user.args[0], user.args[1] % len(xs)) if xs else None
        if is_op(user, aten.index) and user.args[0] is not j:
            indices = list(user.args[1])
            given = [i for i, t in enumerate(indices) if t is not None]
            xs = ctx.shape(user.args[0])
            if xs and len(given) == 1 and indices[given[0]] is j:
                if given[0] == 0 or ctx.rank(j) == 1:
                    return user.args[0], given[0]
        return None


class _Selection:
    """Builds the rank and the one-hot P of one topk (lazily) and the replacement of each consumer."""

    def __init__(self, ctx: PassContext, plan: _TopkPlan, anchor: fx.Node) -> None:
        self.ctx, self.plan = ctx, plan
        self.dtype = ctx.val(plan.scores).dtype
        self._cache: dict[str, fx.Node] = {}
        self._anchor = anchor  # the topk node: everything built from the scores alone goes before it

    def _const(self, value: torch.Tensor, hint: str) -> fx.Node:
        return self.ctx.add_constant(value.to(self.dtype), hint)

    def _shared(self, key: str, build: Callable[[], fx.Node]) -> fx.Node:
        if key not in self._cache:
            with self.ctx.graph.inserting_before(self._anchor):
                self._cache[key] = build()
        return self._cache[key]

    # --- ranks and one-hots ------------------------------------------------------------------------
    def rank_row(self) -> fx.Node:
        """rank (Bp, 1, N): how many scores rank ahead of each one (ties: lower index first)."""
        return self._shared("rank", self._build_rank)

    def _build_rank(self) -> fx.Node:
        c, p = self.ctx, self.plan
        row = c.call(aten.reshape.default, p.scores, [p.batch, 1, p.n])
        col = c.call(aten.reshape.default, p.scores, [p.batch, p.n, 1])
        diff = c.call(aten.sub.Tensor, col, row) if p.largest else c.call(aten.sub.Tensor, row, col)  # [j, i]
        for _ in range(_GAIN_STEPS):  # |s_j - s_i| x 2^45 > 2N + 1 unless (nearly) tied
            diff = c.call(aten.mul.Tensor, diff, _GAIN)
        for row_term, col_term in self._index_terms():  # + 2(i - j) - 1: ties go to the lower index
            diff = c.call(aten.add.Tensor, diff, self._const(row_term.reshape(1, p.n), "tie_i"))
            diff = c.call(aten.sub.Tensor, diff, self._const(col_term.reshape(p.n, 1), "tie_j"))
        # ±1, then the affine map to {0, 1}. Not relu(clip): the ONNX exporter's optimizer fuses that into
        # Clip(0, 1), which the NNAPI EP rejects (it takes Clip only as RELU1 [-1, 1] or RELU6 [0, 6]).
        sign = c.call(aten.clamp.default, diff, -1.0, 1.0)
        ahead = c.call(aten.add.Tensor, c.call(aten.mul.Tensor, sign, 0.5), 0.5)
        ones = self._const(torch.ones(1, p.n), "ones")
        return c.call(aten.matmul.default, ones, ahead)  # (Bp, 1, N)

    def _index_terms(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(row, column) constants summing to 2(i - j) - 1, each term and partial sum exact in fp16.

        One pair (2i - 1, 2j) up to N = 1024 (integers ≤ 2048 are exact in fp16); above, two digits
        (2·64·hi, 2·lo): a non-zero hi difference is ≥ 128 and outweighs the lo terms (|·| ≤ 127).
        """
        i = torch.arange(self.plan.n, dtype=torch.float32)
        if self.plan.n <= 1024:
            return [(2 * i - 1, 2 * i)]
        hi = torch.div(i, _DIGIT, rounding_mode="floor") * _DIGIT
        return [(2 * hi, 2 * hi), (2 * (i - hi) - 1, 2 * (i - hi))]

    def onehot(self, transposed: bool) -> fx.Node:
        """P (Bp, K, N), or Pᵀ (Bp, N, K) when ``transposed``: 1 where rank_i == k."""
        return self._shared("pt" if transposed else "p", lambda: self._build_onehot(transposed))

    def _build_onehot(self, transposed: bool) -> fx.Node:
        c, p = self.ctx, self.plan
        ks = torch.arange(p.k, dtype=torch.float32)
        if transposed:
            rank = c.call(aten.reshape.default, self.rank_row(), [p.batch, p.n, 1])
            delta = c.call(aten.sub.Tensor, rank, self._const(ks.reshape(1, p.k), "k"))
        else:
            delta = c.call(aten.sub.Tensor, self.rank_row(), self._const(ks.reshape(p.k, 1), "k"))
        square = c.call(aten.mul.Tensor, delta, delta)  # integral: 0 on the hit, >= 1 elsewhere
        return c.call(aten.relu.default, c.call(aten.rsub.Scalar, square, 1.0))

    def keep(self, layout: str) -> fx.Node:
        """1 - Σ_k P[k, i]: 0 at the selected positions, as (Bp, 1, N) or (Bp, N, 1)."""
        def build() -> fx.Node:
            c, p = self.ctx, self.plan
            picked = c.call(aten.matmul.default, self._const(torch.ones(1, p.k), "ones"), self.onehot(False))
            kept = c.call(aten.rsub.Scalar, picked, 1.0)
            return kept if layout == "last" else c.call(aten.reshape.default, kept, [p.batch, p.n, 1])
        return self._shared(f"keep_{layout}", build)

    # --- consumers ---------------------------------------------------------------------------------
    def emit(self, use: _Use) -> fx.Node:
        return getattr(self, f"_emit_{use.kind}")(use)

    def _as3(self, x: fx.Node, layout: str) -> fx.Node:
        """x as (Bp, C, N) ("last") or (Bp, N, C) ("first")."""
        p, c = self.plan, self.ctx
        inner = math.prod(c.shape(x)) // (p.batch * p.n)
        shape = [p.batch, inner, p.n] if layout == "last" else [p.batch, p.n, inner]
        return x if list(c.shape(x)) == shape else c.call(aten.reshape.default, x, shape)

    def _back(self, y: fx.Node, shape: tuple[int, ...]) -> fx.Node:
        return y if self.ctx.shape(y) == shape else self.ctx.call(aten.reshape.default, y, list(shape))

    def _emit_values(self, use: _Use) -> fx.Node:
        p, c = self.plan, self.ctx
        col = c.call(aten.reshape.default, p.scores, [p.batch, p.n, 1])
        return self._back(c.call(aten.matmul.default, self.onehot(False), col), c.shape(use.node))

    def _emit_gather(self, use: _Use) -> fx.Node:
        c = self.ctx
        x3 = self._as3(use.x, use.layout)
        if use.layout == "last":
            y = c.call(aten.matmul.default, x3, self.onehot(True))  # (Bp, C, N) @ (Bp, N, K)
        else:
            y = c.call(aten.matmul.default, self.onehot(False), x3)  # (Bp, K, N) @ (Bp, N, C)
        return self._back(y, c.shape(use.node))

    def _emit_scatter(self, use: _Use) -> fx.Node:
        c = self.ctx
        x3 = self._as3(use.x, use.layout)
        kept = c.call(aten.mul.Tensor, x3, self.keep(use.layout))
        if isinstance(use.src, fx.Node):
            src3 = c.call(aten.reshape.default, use.src, self._src_shape(use))
            if use.layout == "last":
                written = c.call(aten.matmul.default, src3, self.onehot(False))  # (Bp, C, K) @ (Bp, K, N)
            else:
                written = c.call(aten.matmul.default, self.onehot(True), src3)  # (Bp, N, K) @ (Bp, K, C)
        else:  # scatter.value: value where selected
            picked = c.call(aten.rsub.Scalar, self.keep(use.layout), 1.0)
            written = c.call(aten.mul.Tensor, picked, float(use.src))
        return self._back(c.call(aten.add.Tensor, kept, written), c.shape(use.node))

    def _src_shape(self, use: _Use) -> list[int]:
        p = self.plan
        inner = math.prod(self.ctx.shape(use.src)) // (p.batch * p.k)
        return [p.batch, inner, p.k] if use.layout == "last" else [p.batch, p.k, inner]

    def _emit_take(self, use: _Use) -> fx.Node:
        c, p = self.ctx, self.plan
        xs = c.shape(use.x)
        if use.layout == "first":  # P_flat (Bp*K, N) @ x (N, rest)
            flat_p = c.call(aten.reshape.default, self.onehot(False), [p.batch * p.k, p.n])
            x2 = use.x if len(xs) == 2 else c.call(aten.reshape.default, use.x, [p.n, math.prod(xs[1:])])
            y = c.call(aten.matmul.default, flat_p, x2)
        else:  # x (rest, N) @ Pᵀ (N, K), one image
            flat_pt = c.call(aten.reshape.default, self.onehot(True), [p.n, p.k])
            x2 = use.x if len(xs) == 2 else c.call(aten.reshape.default, use.x, [math.prod(xs[:-1]), p.n])
            y = c.call(aten.matmul.default, x2, flat_pt)
        return self._back(y, c.shape(use.node))
