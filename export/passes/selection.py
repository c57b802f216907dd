"""Selection: gather/scatter by constant indices → slices or static one-hot matmuls (``static_gather_scatter``);
by top-k indices in ``topk.py`` (``static_topk_select``).

Token-selection models (FilterViT's top-K pixels, DropoutViT's fixed random pixel set, DynamicViT-style
pruning) pick tokens with ``topk`` and move them with ``gather`` / ``index_select`` / ``scatter``. None of
ONNX ``TopK``, ``GatherElements`` or ``ScatterElements`` is in the op lists of onnxruntime's NNAPI or Core ML
(MLProgram) execution providers (onnxruntime/tools/mobile_helpers/*_supported_ops.md),
``gather`` is a known non-ANE layer, and each unsupported node splits the graph into
extra partitions. Both passes express the same selection with ops in *both* EP lists only:
MatMul, Mul, Add, Sub, Reshape, Transpose, Slice, Concat, Relu and Clip with [min, max] = [-1, 1] (the
NNAPI EP accepts Clip only as RELU1 [-1, 1] or RELU6 [0, 6]: nnapi clip_op_support_checker.cc).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from edgevit.export.passes import register_pass
from edgevit.export.passes.repairs import ViewRepairing
from edgevit.export.passes.base import Aliasing, GraphPass, PassContext, aten, is_op

# Ops that only move index values around: the position map of their output is the op applied to the
# position map of their input (see _position_map).
_INDEX_VIEWS = (aten.unsqueeze, aten.expand, aten.reshape, aten.view, aten._unsafe_view, aten.flatten,
                aten.unflatten, aten.squeeze, aten.permute, aten.transpose, aten.t, aten.repeat, aten.clone,
                aten.contiguous, aten.alias, aten.detach, aten.lift_fresh_copy, aten.select, aten.slice)
# Deterministic ops a constant index tensor may be computed with (folded at rewrite time).
# ``detach_`` follows every ``torch.tensor([...])`` literal in a capture (it changes no values).
_FOLDABLE = _INDEX_VIEWS + (aten.add, aten.sub, aten.mul, aten.remainder, aten.floor_divide, aten.cat,
                            aten.stack, aten.slice, aten.select, aten.arange, aten.to, aten._to_copy,
                            aten.index_select, aten.flip, aten.full, aten.zeros, aten.ones, aten.sort,
                            aten.scalar_tensor, operator.getitem, aten.detach_)
_FOLD_LIMIT = 1 << 24  # elements; larger constants are not folded
_MAX_RUNS = 8  # contiguous index runs up to which slice+cat is used instead of a one-hot matmul


# --- constants ---------------------------------------------------------------------------------------------


def _fold(ctx: PassContext, node: Any) -> Any:
    """The value of ``node`` if it is computed from constants only by deterministic ops, else None.

    Not when an in-place op outside that subgraph writes what it reads (a buffer updated in forward, or
    ``idx = arange(n); idx[0] = 3``, whose readers still name the ``arange`` node).
    """
    memo: dict[fx.Node, Any] = {}
    value = _fold_from(ctx, node, memo)
    return value if Aliasing.of(ctx).closed(memo) else None


def _fold_from(ctx: PassContext, node: Any, memo: dict[fx.Node, Any]) -> Any:
    if not isinstance(node, fx.Node):
        if isinstance(node, (list, tuple)):
            items = [_fold_from(ctx, a, memo) for a in node]
            return None if any(i is None and a is not None for i, a in zip(items, node)) else type(node)(items)
        return node
    if node in memo:
        return memo[node]
    value: Any = None
    if node.op == "get_attr":
        value = ctx.constant(node)
    elif node.op == "call_function" and is_op(node, *_FOLDABLE):
        args = [_fold_from(ctx, a, memo) for a in node.args]
        kwargs = {k: _fold_from(ctx, v, memo) for k, v in node.kwargs.items()}
        missing = any(v is None and a is not None for v, a in zip(args, node.args))
        if not missing and all(v is not None or node.kwargs[k] is None for k, v in kwargs.items()):
            with torch.no_grad():
                value = node.target(*args, **kwargs)
    if isinstance(value, torch.Tensor) and value.numel() > _FOLD_LIMIT:
        value = None
    memo[node] = value
    return value


def _broadcast_vector(index: torch.Tensor, dim: int) -> torch.Tensor | None:
    """The 1-D ``v`` with ``index == v`` broadcast along every dim but ``dim``, or None if none exists."""
    rows = index.movedim(dim, -1).reshape(-1, index.shape[dim])
    if rows.shape[0] and not bool((rows == rows[:1]).all()):
        return None
    return rows[0].clone() if rows.shape[0] else None


def _runs(v: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive values in ``v``: (position in v, first value, length)."""
    runs: list[tuple[int, int, int]] = []
    for pos, value in enumerate(v):
        if runs and runs[-1][1] + runs[-1][2] == value:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((pos, value, 1))
    return runs


def _one_hot(v: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """S (K, N) with S[k, v[k]] = 1."""
    s = torch.zeros(len(v), n, dtype=dtype)
    s[torch.arange(len(v)), v] = 1
    return s


def _along(ctx: PassContext, x: fx.Node, dim: int, matrix: torch.Tensor, hint: str) -> fx.Node:
    """``y`` with y[.., k, ..] = Σ_i matrix[k, i] x[.., i, ..] along ``dim`` (matrix: (K, N)), as one MatMul."""
    rank = ctx.rank(x)
    if dim == rank - 1:  # (..., N) @ (N, K)
        return ctx.call(aten.matmul.default, x, ctx.add_constant(matrix.t().contiguous(), hint))
    if dim == rank - 2:  # (K, N) @ (..., N, C)
        return ctx.call(aten.matmul.default, ctx.add_constant(matrix, hint), x)
    moved = ctx.call(aten.transpose.int, x, dim, rank - 1)
    out = ctx.call(aten.matmul.default, moved, ctx.add_constant(matrix.t().contiguous(), hint))
    return ctx.call(aten.transpose.int, out, dim, rank - 1)


def _mask_shape(rank: int, dim: int, n: int) -> list[int]:
    return [n] + [1] * (rank - 1 - dim)


def _cat(ctx: PassContext, pieces: list[fx.Node], dim: int) -> fx.Node:
    return pieces[0] if len(pieces) == 1 else ctx.call(aten.cat.default, pieces, dim)


def _slice(ctx: PassContext, x: fx.Node, dim: int, start: int, end: int) -> fx.Node:
    size = ctx.shape(x)[dim]
    return x if (start, end) == (0, size) else ctx.call(aten.slice.Tensor, x, dim, start, end)


@dataclass
class _ConstSite:
    """One gather-like (``src`` None) or scatter (``src`` a node or a number) with constant indices."""

    x: fx.Node
    dim: int
    v: torch.Tensor  # the selected positions along dim, in output order
    src: Any = None
    scatter: bool = False


@register_pass
class StaticGatherScatter(ViewRepairing, GraphPass):
    """``gather`` / ``index_select`` / ``x[idx]`` / ``scatter`` with CONSTANT indices → slices or one-hot MatMuls.

    Why: ONNX ``GatherElements`` / ``ScatterElements`` (what ``gather``/``scatter`` export to) are in
    neither the NNAPI nor the Core ML (MLProgram) EP op list of onnxruntime, and
    ``gather`` is not an ANE op; DropoutViT's fixed eval pixel set
    (``eval_index`` buffer) exports as exactly these. With the indices known at export time,
    gather(x, d, v) = S @ x along d with the constant one-hot S (K, N), S[k, v_k] = 1, and
    scatter(x, d, v, src) = x * keep + Sᵀ @ src along d, keep = 1 - Σ_k S[k, :] (unique v only).
    Indices that form at most 8 contiguous runs become ``slice`` + ``cat`` instead (no arithmetic).
    When ``x`` is also constant (a positional table read by fixed indices) the node is folded.
    The indices must be the same along every dim but ``d`` (a broadcast vector); other sites are left.

    Exact: every output element is one input element times 1 plus exact zeros (torch.equal in fp32 and
    in fp16), for finite ``x`` (an inf/NaN outside the selection would give 0 * inf = NaN).
    Cost: K*N*C MACs per site and a K*N constant (e.g. 256 x 3025 fp32 = 3.1 MB for a 55x55 map).
    A site whose result or ``x`` an in-place op writes is left alone (the gather's copy would become a
    view of ``x`` or a stored constant, which the write would then reach).
    """

    name = "static_gather_scatter"
    exact = True
    fixes = ("GatherElements", "ScatterElements", "Gather", "gather", "gather_along_axis", "scatter",
             "scatter_along_axis", "GATHER", "SCATTER_ND")

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        return is_op(node, aten.gather, aten.index_select, aten.scatter, aten.index) and ctx.shape(node) is not None

    def rewrite(self, ctx: PassContext, node: fx.Node) -> bool | None:
        writes = Aliasing.of(ctx)
        if writes.written(node) or writes.written(node.args[0]):
            return False
        folded = self._fold_whole(ctx, node)
        if folded is not None:
            ctx.replace(node, ctx.add_constant(folded, "selected"))
            return None
        site = self._site(ctx, node)
        if site is None:
            return False
        ctx.replace(node, self._scatter(ctx, site) if site.scatter else self._gather(ctx, site))
        return None

    # --- analysis --------------------------------------------------------------------------------
    @staticmethod
    def _fold_whole(ctx: PassContext, node: fx.Node) -> torch.Tensor | None:
        """A gather-like read of a constant table by constant indices is itself a constant."""
        if is_op(node, aten.scatter):
            return None
        value = _fold(ctx, node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if not isinstance(value, torch.Tensor):
            return None
        args = [_fold(ctx, a) for a in node.args]
        if any(a is None and b is not None for a, b in zip(args, node.args)):
            return None
        with torch.no_grad():
            out = node.target(*args, **node.kwargs)
        if not isinstance(out, torch.Tensor):
            return None
        # Fold a read that does not grow the table, or a small one (no large duplicated constants).
        return out if out.numel() <= value.numel() or out.numel() * out.element_size() <= 1 << 20 else None

    def _site(self, ctx: PassContext, node: fx.Node) -> _ConstSite | None:
        x = node.args[0]
        xs = ctx.shape(x)
        if xs is None:
            return None
        if is_op(node, aten.index):
            return self._index_site(ctx, node, x, xs)
        dim = node.args[1] % len(xs) if xs else 0
        index = _fold(ctx, node.args[2])
        if not isinstance(index, torch.Tensor) or index.is_floating_point() or index.dtype == torch.bool:
            return None
        n = xs[dim]
        if is_op(node, aten.index_select):
            v = index.reshape(-1)
        else:
            if node.kwargs.get("reduce") is not None or node.kwargs.get("sparse_grad") or len(node.args) > 4:
                return None
            if index.dim() != len(xs) or any(index.shape[i] != xs[i] for i in range(len(xs)) if i != dim):
                return None
            v = _broadcast_vector(index, dim)
        if v is None or not len(v) or bool((v < 0).any()) or bool((v >= n).any()):
            return None
        if not is_op(node, aten.scatter):
            return self._checked(ctx, _ConstSite(x, dim, v))
        if len(set(v.tolist())) != len(v):  # duplicates: scatter's result is unspecified
            return None
        src = node.args[3]
        if isinstance(src, fx.Node) and ctx.shape(src) != tuple(index.shape):
            return None
        return self._checked(ctx, _ConstSite(x, dim, v, src, scatter=True))

    @staticmethod
    def _checked(ctx: PassContext, site: _ConstSite) -> _ConstSite | None:
        """The one-hot MatMul needs a floating-point x; integer tensors take the slice form or stay."""
        if ctx.val(site.x).dtype.is_floating_point:
            return site
        few = len(_runs(site.v.tolist())) <= _MAX_RUNS
        return site if few and (not site.scatter or isinstance(site.src, fx.Node)) else None

    def _index_site(self, ctx: PassContext, node: fx.Node, x: fx.Node, xs: tuple[int, ...]) -> _ConstSite | None:
        """``x[:, ..., idx]`` with one 1-D integer constant index (index_select semantics)."""
        indices = list(node.args[1])
        given = [i for i, t in enumerate(indices) if t is not None]
        if len(given) != 1:
            return None
        dim = given[0]
        index = _fold(ctx, indices[dim])
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.is_floating_point() \
                or index.dtype == torch.bool:
            return None
        n = xs[dim]
        if bool((index < -n).any()) or bool((index >= n).any()) or not len(index):
            return None
        return self._checked(ctx, _ConstSite(x, dim, index % n))

    # --- building --------------------------------------------------------------------------------
    @staticmethod
    def _gather(ctx: PassContext, site: _ConstSite) -> fx.Node:
        v = site.v.tolist()
        runs = _runs(v)
        if len(runs) <= _MAX_RUNS:
            return _cat(ctx, [_slice(ctx, site.x, site.dim, a, a + n) for _, a, n in runs], site.dim)
        onehot = _one_hot(site.v, ctx.shape(site.x)[site.dim], ctx.val(site.x).dtype)
        return _along(ctx, site.x, site.dim, onehot, "gather")

    @staticmethod
    def _scatter(ctx: PassContext, site: _ConstSite) -> fx.Node:
        x, dim, v = site.x, site.dim, site.v.tolist()
        xs = ctx.shape(x)
        runs = sorted(_runs(v), key=lambda r: r[1])
        if isinstance(site.src, fx.Node) and len(runs) <= _MAX_RUNS:
            pieces, at = [], 0
            for pos, start, length in runs:  # x before the run, then the run's slice of src
                if start > at:
                    pieces.append(_slice(ctx, x, dim, at, start))
                pieces.append(_slice(ctx, site.src, dim, pos, pos + length))
                at = start + length
            if at < xs[dim]:
                pieces.append(_slice(ctx, x, dim, at, xs[dim]))
            return _cat(ctx, pieces, dim)
        dtype = ctx.val(x).dtype
        s = _one_hot(site.v, xs[dim], dtype)
        selected = s.sum(0)  # 1 at the written positions
        mask_shape = _mask_shape(len(xs), dim, xs[dim])
        kept = ctx.call(aten.mul.Tensor, x, ctx.add_constant((1 - selected).reshape(mask_shape), "keep"))
        if isinstance(site.src, fx.Node):
            written = _along(ctx, site.src, dim, s.t().contiguous(), "scatter")
        else:  # scatter.value: the written value is a constant
            written = ctx.add_constant((selected * site.src).reshape(mask_shape).to(dtype), "fill")
        return ctx.call(aten.add.Tensor, kept, written)
