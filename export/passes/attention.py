"""Attention lowering: ``scaled_dot_product_attention`` as explicit matmul/softmax/matmul, ``einsum`` as matmul.

Every pass here matches plain ATen patterns (any model, not only the zoo) and leaves a site alone
when a shape, a dtype or a constant it needs is unknown. The other attention-related passes live
next to this module: ``softmax_last_axis`` (``softmax.py``), ``finite_masks`` (``masks.py``, which
uses this module's :data:`MASK_VALUE` and SDPA argument helpers) and ``expand_to_broadcast``
(``broadcast.py``).
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx

from edgevit.export.passes import register_pass
from edgevit.export.passes.repairs import ViewRepairing
from edgevit.export.passes.base import Aliasing, GraphPass, PassContext, aten, is_op

#: The finite "masked" logit of R5 (Apple's ane_transformers uses ``mask * -1e4``).
MASK_VALUE = -1e4
#: Constant subgraphs larger than this are not folded to inspect a mask (keeps passes cheap).
_FOLD_MAX_NUMEL = 1 << 22
_FOLD_MAX_NODES = 64


# --- shared helpers ---------------------------------------------------------------------------

def _is_float(ctx: PassContext, node: Any) -> bool:
    v = ctx.val(node)
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point


class _NotConstant(Exception):
    pass


def _fold(ctx: PassContext, node: Any, memo: dict[fx.Node, Any] | None = None) -> Any:
    """The value of ``node`` when it is computed from constants only (no graph input upstream).

    Raises ``_NotConstant`` when a graph input or a random op is reached or the subgraph is large.
    Used to read masks built in the graph (``full`` + ``triu``, ``zeros`` + ``masked_fill_``).
    """
    memo = {} if memo is None else memo
    if not isinstance(node, fx.Node):
        return node
    if node in memo:
        return memo[node]
    if len(memo) > _FOLD_MAX_NODES:
        raise _NotConstant
    v = ctx.val(node)
    if isinstance(v, torch.Tensor) and v.numel() > _FOLD_MAX_NUMEL:
        raise _NotConstant
    if node.op == "get_attr":
        value = ctx.constant(node)
        if value is None:
            raise _NotConstant
        value = value.detach().clone()  # an in-place op in the subgraph must not touch the buffer
    elif node.op == "call_function":
        if torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ()):
            raise _NotConstant  # random values differ at run time
        args = fx.node.map_aggregate(node.args, lambda a: _fold(ctx, a, memo))
        kwargs = fx.node.map_aggregate(node.kwargs, lambda a: _fold(ctx, a, memo))
        with torch.no_grad():
            value = node.target(*args, **kwargs)
    else:
        raise _NotConstant
    memo[node] = value
    return value


def constant_value(ctx: PassContext, node: Any) -> torch.Tensor | None:
    """The value of a mask (or any small tensor) computed from constants only, else None.

    Not when an in-place op outside the subgraph writes what it reads (``mask = ones(..);
    mask[:, 2:] = False``: the mask's readers still name the ``ones`` node, the write is elsewhere).
    """
    memo: dict[fx.Node, Any] = {}
    try:
        value = _fold(ctx, node, memo)
    except _NotConstant:
        return None
    except Exception:  # an op without an eager CPU kernel here: treat the value as unknown
        return None
    if not Aliasing.of(ctx).closed(memo):
        return None
    return value.detach() if isinstance(value, torch.Tensor) else None


def _view_to_rank(value: torch.Tensor, rank: int) -> torch.Tensor:
    """Leading singleton dims up to ``rank`` (same-rank broadcasting, R6)."""
    return value.reshape((1,) * (rank - value.dim()) + tuple(value.shape)) if value.dim() < rank else value


# --- 1. einsum → matmul ----------------------------------------------------------------------

@dataclass
class _Operand:
    node: fx.Node
    labels: list[str]
    sizes: list[int]


def _parse_einsum(equation: str, ranks: Sequence[int]) -> tuple[list[list[str]], list[str]] | None:
    """Labels per operand and for the output, with ``...`` expanded and an implicit output made explicit.

    Returns None for what this pass does not handle (malformed or labels torch would reject).
    """
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        return None
    tokens: list[list[str]] = []
    for term in terms:
        if term.count("...") > 1 or "." in term.replace("...", ""):
            return None
        head, dots, tail = term.partition("...")
        tokens.append(list(head) + (["..."] if dots else []) + list(tail))
    letters = [t for toks in tokens for t in toks if t != "..."]
    if not all(c in string.ascii_letters for c in letters):
        return None
    has_dots = any("..." in toks for toks in tokens)
    if arrow:
        if rhs.count("...") > 1 or "." in rhs.replace("...", ""):
            return None
        head, dots, tail = rhs.partition("...")
        out = list(head) + (["..."] if dots else []) + list(tail)
    else:  # torch: ellipsis dims first, then the labels seen exactly once, sorted
        once = sorted(c for c in set(letters) if letters.count(c) == 1)
        out = (["..."] if has_dots else []) + once
    # expand the ellipsis, right-aligned across operands
    free = [c for c in string.ascii_letters if c not in letters and c not in out]
    widths = [rank - (len(toks) - 1) if "..." in toks else 0 for toks, rank in zip(tokens, ranks)]
    if any(w < 0 for w in widths):
        return None
    width = max(widths, default=0)
    dots_labels = free[:width]
    labels = []
    for toks, w, rank in zip(tokens, widths, ranks):
        expanded = [x for t in toks for x in (dots_labels[width - w:] if t == "..." else [t])]
        if len(expanded) != rank:
            return None
        labels.append(expanded)
    out_labels = [x for t in out for x in (dots_labels if t == "..." else [t])]
    if len(set(out_labels)) != len(out_labels) or not set(out_labels) <= set(letters) | set(dots_labels):
        return None
    return labels, out_labels


class _Einsum:
    """Builds the matmul form of one einsum site (after validation in ``plan``)."""

    def __init__(self, ctx: PassContext, operands: list[_Operand], out: list[str]):
        self.ctx, self.ops, self.out = ctx, operands, out

    @classmethod
    def plan(cls, ctx: PassContext, node: fx.Node) -> "_Einsum | None":
        equation, tensors = node.args[0], node.args[1]
        if not isinstance(equation, str) or not isinstance(tensors, (list, tuple)) or len(tensors) not in (1, 2):
            return None
        shapes = [ctx.shape(t) for t in tensors]
        if any(s is None for s in shapes) or not _is_float(ctx, node):
            return None
        if len({ctx.val(t).dtype for t in tensors}) != 1:
            return None
        parsed = _parse_einsum(equation, [len(s) for s in shapes])
        if parsed is None:
            return None
        labels, out = parsed
        if any(len(set(lab)) != len(lab) for lab in labels):  # diagonal / trace: not handled
            return None
        operands = [_Operand(t, list(lab), list(s)) for t, lab, s in zip(tensors, labels, shapes)]
        sizes: dict[str, int] = {}
        for op in operands:
            for lab, size in zip(op.labels, op.sizes):
                if size != 1 and sizes.get(lab, 1) not in (1, size):
                    return None  # incompatible sizes; torch would reject it too
                sizes[lab] = max(sizes.get(lab, 1), size)
        return cls(ctx, operands, out)

    # -- building blocks --
    def _reshape(self, node: fx.Node, shape: list[int]) -> fx.Node:
        return node if list(self.ctx.shape(node)) == shape else self.ctx.call(aten.reshape.default, node, shape)

    def _permute(self, node: fx.Node, have: list[str], want: list[str]) -> fx.Node:
        perm = [have.index(c) for c in want]
        return node if perm == sorted(perm) else self.ctx.call(aten.permute.default, node, perm)

    def _drop_broadcast_ones(self) -> None:
        """A label of size 1 here and larger in the other operand: drop it here (it broadcasts)."""
        if len(self.ops) != 2:
            return
        for op, other in ((self.ops[0], self.ops[1]), (self.ops[1], self.ops[0])):
            drop = [lab for lab, s in zip(op.labels, op.sizes)
                    if s == 1 and lab in other.labels and other.sizes[other.labels.index(lab)] != 1]
            if drop:
                keep = [i for i, lab in enumerate(op.labels) if lab not in drop]
                op.labels = [op.labels[i] for i in keep]
                op.sizes = [op.sizes[i] for i in keep]
                op.node = self._reshape(op.node, op.sizes)

    def _sum_private(self) -> None:
        """Sum out labels that live in one operand only and not in the output."""
        for op in self.ops:
            others = {lab for o in self.ops if o is not op for lab in o.labels}
            gone = [i for i, lab in enumerate(op.labels) if lab not in others and lab not in self.out]
            if gone:
                op.node = self.ctx.call(aten.sum.dim_IntList, op.node, gone, False)
                op.labels = [lab for i, lab in enumerate(op.labels) if i not in gone]
                op.sizes = [s for i, s in enumerate(op.sizes) if i not in gone]

    def build(self) -> fx.Node:
        self._drop_broadcast_ones()
        self._sum_private()
        if len(self.ops) == 1:
            op = self.ops[0]
            return self._permute(op.node, op.labels, self.out)
        a, b = self.ops
        batch = [c for c in self.out if c in a.labels and c in b.labels]
        left = [c for c in self.out if c in a.labels and c not in b.labels]
        right = [c for c in self.out if c in b.labels and c not in a.labels]
        contracted = [c for c in a.labels if c in b.labels and c not in self.out]
        if contracted:
            product = self._matmul(batch, left, right, contracted)
        else:  # element-wise / outer product: one broadcasting mul
            product = self._mul(batch, left, right)
        return self._permute(product, batch + left + right, self.out)

    def _sizes(self, labels: list[str]) -> list[int]:
        size = {lab: s for op in self.ops for lab, s in zip(op.labels, op.sizes)}
        return [size[c] for c in labels]

    def _mul(self, batch: list[str], left: list[str], right: list[str]) -> fx.Node:
        a, b = self.ops
        dims = self._sizes(batch)
        x = self._reshape(self._permute(a.node, a.labels, batch + left), dims + self._sizes(left) + [1] * len(right))
        y = self._reshape(self._permute(b.node, b.labels, batch + right), dims + [1] * len(left) + self._sizes(right))
        return self.ctx.call(aten.mul.Tensor, x, y)

    def _matmul(self, batch: list[str], left: list[str], right: list[str], contracted: list[str]) -> fx.Node:
        """(B, M, K) @ (B, K, N) with the batch, left, right and contracted labels each merged."""
        a, b = self.ops
        dims = self._sizes(batch)
        m, n, k = (math.prod(self._sizes(group)) for group in (left, right, contracted))
        lead = [math.prod(dims)] if batch else []
        x = self._reshape(self._permute(a.node, a.labels, batch + left + contracted), lead + [m, k])
        y = self._reshape(self._permute(b.node, b.labels, batch + contracted + right), lead + [k, n])
        product = self.ctx.call(aten.matmul.default, x, y)
        return self._reshape(product, dims + self._sizes(left) + self._sizes(right))


@register_pass
class EinsumToMatmul(ViewRepairing, GraphPass):
    """``einsum`` with one or two operands → permute/reshape + ``matmul`` (bmm form) + reshape/permute.

    Single-operand equations become ``sum`` + ``permute``; two-operand ones without a contracted
    label become one broadcasting ``mul``. Handles batch, contracted, left-only and right-only
    labels, ellipses, implicit outputs (``ij,jk``) and size-1 broadcast labels; leaves repeated
    labels in one operand (diagonals/traces) and three or more operands alone.
    Why: coremltools lowers only whitelisted equations natively and its generic path
    fails on others — coremltools 9.0: ``ij,jk`` → "unsupported einsum equation ij,jk",
    ``...qd,...kd->...qk`` → "perm should have the same length as rank(x): 5 != 4" (coremltools issue #2644),
    a broadcast batch label → "Invalid target shape in `reshape` op"; ONNX ``Einsum`` is in neither
    the NNAPI nor the Core ML EP op list of the ORT mobile checker. MatMul/Transpose/Reshape are
    supported everywhere. Note: on Core ML this also rewrites the ANE reference equations that R9
    would keep as native MIL ``einsum``.
    Exact up to float re-association: each output is the same dot product of length K, possibly
    summed in another order; |Δ| ≤ 2·K·2⁻²⁴·Σ|a·b| (the standard dot-product rounding bound).
    """

    name = "einsum_to_matmul"
    fixes = ("Einsum", "einsum")

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        return is_op(node, aten.einsum) and _Einsum.plan(ctx, node) is not None

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        ctx.replace(node, _Einsum.plan(ctx, node).build())


# --- 2. scaled_dot_product_attention → explicit attention -------------------------------------

def _sdpa_arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _sdpa_mask(node: fx.Node) -> Any:
    return _sdpa_arg(node, 3, "attn_mask", None)


def _constant_mask(mask: torch.Tensor, dtype: torch.dtype, rank: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Additive mask and, when some row is fully masked, the 0/1 row multiplier SDPA implies.

    SDPA returns zeros for a row with nothing to attend to (``_safe_softmax``); a plain softmax would
    give NaN (-inf row) or a uniform average (finite row), so those rows are zeroed explicitly.
    """
    if mask.dtype == torch.bool:
        full = ~mask.any(-1, keepdim=True)
        additive = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, MASK_VALUE)
    else:
        full = torch.isneginf(mask).all(-1, keepdim=True)
        additive = mask.to(dtype)
    keep = None
    if bool(full.any()):
        additive = additive.masked_fill(full, 0.0)
        keep = _view_to_rank((~full).to(dtype), rank)
    return _view_to_rank(additive, rank), keep


@register_pass
class SdpaToExplicit(GraphPass):
    """``scaled_dot_product_attention`` → (q·scale) @ kᵀ (+ mask) → softmax(-1) → @ v.

    Boolean masks become an additive constant with -1e4 at masked positions; float masks are
    added as they are; ``is_causal`` becomes a constant mask; rows that SDPA would zero (nothing to
    attend to) are zeroed by a constant multiplier. A runtime boolean mask becomes
    ``(float(mask) - 1) * 1e4`` with an ``amax`` row guard; a runtime float mask, dropout > 0,
    ``enable_gqa`` and ranks outside 2..4 are left alone. ``nn.MultiheadAttention`` in eval with
    ``need_weights=False`` is captured as this op too (with ``need_weights=True`` it is already
    bmm + softmax).
    Why: the ONNX exporter lowers a boolean-masked SDPA with ``IsNaN`` + ``Where``
    (its safe softmax), which the NNAPI and Core ML EPs do not take (two partitions), and litert-torch
    adds SELECT_V2 for ``is_causal``; coremltools' SDPA lowering failed for DETR's nn.Transformer
    (coremltools issue #2155). The explicit matmul-softmax-matmul in (B, H, N, D) with softmax on the last axis is
    what every backend runs.
    Exact up to float re-association (scale applied to q once instead of √scale to q and k;
    |Δ| ~ (D + S)·2⁻²⁴ relative), and exact in fp32 for -1e4 vs -inf on rows not fully masked.
    """

    name = "sdpa_to_explicit"
    fixes = ("scaled_dot_product_attention", "IsNaN", "Attention", "sdpa")

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        if not is_op(node, aten.scaled_dot_product_attention) or len(node.args) < 3:
            return False
        q, k, v = node.args[:3]
        ranks = [ctx.rank(t) for t in (q, k, v)]
        if any(r is None or not 2 <= r <= 4 for r in ranks) or not _is_float(ctx, q):
            return False
        if _sdpa_arg(node, 4, "dropout_p", 0.0) != 0.0 or node.kwargs.get("enable_gqa", False):
            return False
        mask = _sdpa_mask(node)
        if mask is None:
            return True
        if _sdpa_arg(node, 5, "is_causal", False):
            return False  # torch rejects mask + is_causal
        return constant_value(ctx, mask) is not None or ctx.val(mask).dtype == torch.bool

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        q, k, v = node.args[:3]
        dtype, rank = ctx.val(q).dtype, ctx.rank(node)
        scale = node.kwargs.get("scale")
        scale = 1.0 / math.sqrt(ctx.shape(q)[-1]) if scale is None else float(scale)
        additive, keep = self._mask(ctx, node, dtype, rank)
        logits = ctx.call(aten.matmul.default, ctx.call(aten.mul.Tensor, q, scale),
                          ctx.call(aten.transpose.int, k, -2, -1))
        if additive is not None:
            logits = ctx.call(aten.add.Tensor, logits, additive)
        probs = ctx.call(aten.softmax.int, logits, -1)
        if keep is not None:
            probs = ctx.call(aten.mul.Tensor, probs, keep)
        ctx.replace(node, ctx.call(aten.matmul.default, probs, v))
        ctx.graph.erase_node(node)  # SDPA is tagged nondeterministic (dropout): DCE keeps it

    @staticmethod
    def _mask(ctx: PassContext, node: fx.Node, dtype: torch.dtype, rank: int) -> tuple[Any, Any]:
        mask = _sdpa_mask(node)
        if mask is None and _sdpa_arg(node, 5, "is_causal", False):
            length, source = ctx.shape(node.args[0])[-2], ctx.shape(node.args[1])[-2]
            value = torch.ones(length, source, dtype=torch.bool).tril()
        elif mask is None:
            return None, None
        else:
            value = constant_value(ctx, mask)
        if value is not None:
            additive, keep = _constant_mask(value, dtype, rank)
            return (ctx.add_constant(additive, "attn_mask"),
                    None if keep is None else ctx.add_constant(keep, "attn_keep"))
        # runtime boolean mask: Cast/Sub/Mul (in the NNAPI and Core ML EP lists) instead of Where;
        # the amax (ReduceMax) row guard zeroes rows with nothing to attend to, as SDPA does
        ones = ctx.call(aten._to_copy.default, mask, dtype=dtype)
        shape = [1] * (rank - ctx.rank(mask)) + list(ctx.shape(mask))
        ones = ones if ctx.rank(mask) == rank else ctx.call(aten.reshape.default, ones, shape)
        additive = ctx.call(aten.mul.Tensor, ctx.call(aten.sub.Tensor, ones, 1.0), -MASK_VALUE)
        keep = ctx.call(aten.amax.default, ones, [-1], True)
        return additive, keep
