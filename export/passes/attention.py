"""Attention rewrites: softmax axis, fp16-safe masks, implicit broadcasting, einsum and SDPA lowering.

Every pass here matches plain ATen patterns (any model, not only the zoo) and leaves a site alone
when a shape, a dtype or a constant it needs is unknown.
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
#: Mask values at or below this overflow to -inf in float16 once a logit is added (finfo(fp16).min).
_FP16_MIN = float(torch.finfo(torch.float16).min)
#: Constant subgraphs larger than this are not folded to inspect a mask (keeps passes cheap).
_FOLD_MAX_NUMEL = 1 << 22
_FOLD_MAX_NODES = 64

_SOFTMAXES = (aten.softmax, aten._softmax, aten._safe_softmax, aten.log_softmax, aten._log_softmax)


# --- shared helpers ---------------------------------------------------------------------------

def _norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


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


# --- 1. softmax on the last axis --------------------------------------------------------------

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


# --- 2. finite masks --------------------------------------------------------------------------

# Ops a mask passes through on its way to the softmax (views, casts, combination with logits).
_MASK_CARRIERS = (
    aten.view, aten.reshape, aten.unsqueeze, aten.squeeze, aten.expand, aten.expand_as, aten.permute,
    aten.transpose, aten.slice, aten.select, aten.clone, aten.contiguous, aten.alias, aten._to_copy,
    aten.to, aten.unflatten, aten.flatten, aten.repeat, aten.cat, aten.stack, aten.triu, aten.tril,
    aten.add, aten.masked_fill, aten.masked_fill_, aten.where, aten.detach, aten.lift_fresh_copy,
)
# Where the scalar fill value sits, per op (argument index).
_SCALAR_FILLS: tuple[tuple[Any, tuple[int, ...]], ...] = (
    (aten.masked_fill.Scalar, (2,)), (aten.masked_fill_.Scalar, (2,)),
    (aten.full.default, (1,)), (aten.full_like.default, (1,)), (aten.new_full.default, (2,)),
    (aten.scalar_tensor.default, (0,)), (aten.fill.Scalar, (1,)), (aten.fill_.Scalar, (1,)),
    (aten.where.ScalarOther, (2,)), (aten.where.ScalarSelf, (1,)), (aten.where.Scalar, (1, 2)),
)


# Softmaxes whose masked outputs are 0 either way; log_softmax is excluded (its masked outputs
# would change from -inf to about -1e4).
_MASK_TARGETS = (aten.softmax, aten._softmax, aten._safe_softmax)


def _is_sentinel(value: Any) -> bool:
    return isinstance(value, float) and value <= _FP16_MIN


def _feeds_softmax(node: fx.Node, depth: int = 12) -> bool:
    """True when ``node``'s value reaches a softmax (or SDPA's mask) through mask-carrying ops."""
    frontier, seen = [node], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for user in n.users:
                if user in seen:
                    continue
                seen.add(user)
                if is_op(user, *_MASK_TARGETS) and user.args[0] is n:
                    return True
                if is_op(user, aten.scaled_dot_product_attention) and _sdpa_mask(user) is n:
                    return True
                if is_op(user, *_MASK_CARRIERS):
                    nxt.append(user)
        frontier = nxt
    return False


def _zero_one(ctx: PassContext, node: Any, depth: int = 6) -> bool:
    """True when ``node`` only holds 0 and 1 (a bool mask, cast, or ``1 - mask``)."""
    v = ctx.val(node)
    if not isinstance(v, torch.Tensor) or depth == 0:
        return False
    if v.dtype == torch.bool:
        return True
    if is_op(node, aten._to_copy, aten.to, aten.view, aten.reshape, aten.unsqueeze, aten.expand,
             aten.clone, aten.contiguous, aten.alias, aten.logical_not, aten.bitwise_not):
        return _zero_one(ctx, node.args[0], depth - 1)
    if is_op(node, aten.rsub) and len(node.args) >= 2 and node.args[1] in (1, 1.0):  # 1 - mask
        return _zero_one(ctx, node.args[0], depth - 1)
    return False


@register_pass
class FiniteMasks(GraphPass):
    """-inf / finfo(fp32).min / finfo(fp16).min attention-mask values → -1e4.

    Rewrites the scalar of ``masked_fill`` / ``full`` / ``full_like`` / ``new_full`` / ``fill`` /
    ``scalar_tensor`` / ``where``, a ``(1 - mask) * finfo.min`` product, and constant mask tensors
    (buffers) — only where the value reaches a softmax (or SDPA's ``attn_mask``) through views,
    casts, ``triu``/``tril`` and ``add``.
    Why: the fp32-min sentinel overflows to -inf in fp16, and ``-inf + x`` or
    ``finfo(fp16).min + x`` is -inf, so a fully masked row becomes softmax(-inf, …, -inf) = NaN
    (coremltools PR #2669; HF transformers #17306). Core ML/ANE, the TFLite GPU delegate and the
    OpenVINO GPU/NPU plugins run fp16. -1e4 is Apple's own mask value (ane_transformers distilbert).
    Exact in fp32 for rows that are not fully masked: a masked weight exp(-1e4 + l - max) underflows
    to 0 just as exp(-inf) does whenever the unmasked logits exceed the masked ones by less than
    1e4 - 104. A fully masked row changes: NaN/uniform before, finite after (that is the fix). The
    pipeline holds an exact pass to fp32 rounding of the model's outputs, and parity compares with the
    model, so on a model whose fp32 outputs include a fully masked row the pass is rolled back there.
    """

    name = "finite_masks"
    fixes = ("-inf mask", "fp16 mask overflow", "NaN in fp16")

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        if not _is_float(ctx, node) or not _feeds_softmax(node):
            return False
        return bool(self._scalar_slots(ctx, node) or self._constant_args(ctx, node))

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        args = list(node.args)
        for i in self._scalar_slots(ctx, node):
            args[i] = MASK_VALUE
        for i, value in self._constant_args(ctx, node):
            clamped = torch.where(value <= _FP16_MIN, torch.full_like(value, MASK_VALUE), value)
            args[i] = ctx.add_constant(clamped, "finite_mask")
        node.args = tuple(args)

    @staticmethod
    def _scalar_slots(ctx: PassContext, node: fx.Node) -> list[int]:
        for op, slots in _SCALAR_FILLS:
            if node.target is op:
                return [i for i in slots if i < len(node.args) and _is_sentinel(node.args[i])]
        if is_op(node, aten.mul) and len(node.args) == 2:  # (1 - mask) * finfo.min
            a, b = node.args
            if _is_sentinel(b) and _zero_one(ctx, a):
                return [1]
            if _is_sentinel(a) and _zero_one(ctx, b):
                return [0]
        return []

    @staticmethod
    def _constant_args(ctx: PassContext, node: fx.Node) -> list[tuple[int, torch.Tensor]]:
        found: list[tuple[int, torch.Tensor]] = []
        if not is_op(node, *_MASK_CARRIERS):  # a buffer is a mask only where masks travel
            return found
        for i, a in enumerate(node.args):
            value = ctx.constant(a)
            if value is not None and value.dtype.is_floating_point and value.numel() \
                    and bool((value <= _FP16_MIN).any()):
                found.append((i, value.detach()))
        return found


# --- 3. expand → implicit broadcasting ---------------------------------------------------------

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


# --- 4. einsum → matmul ----------------------------------------------------------------------

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
    ``...qd,...kd->...qk`` → "perm should have the same length as rank(x): 5 != 4" (#2644),
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


# --- 5. scaled_dot_product_attention → explicit attention -------------------------------------

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

    Boolean masks become an additive constant with -1e4 at masked positions (R5); float masks are
    added as they are; ``is_causal`` becomes a constant mask; rows that SDPA would zero (nothing to
    attend to) are zeroed by a constant multiplier. A runtime boolean mask becomes
    ``(float(mask) - 1) * 1e4`` with an ``amax`` row guard; a runtime float mask, dropout > 0,
    ``enable_gqa`` and ranks outside 2..4 are left alone. ``nn.MultiheadAttention`` in eval with
    ``need_weights=False`` is captured as this op too (with ``need_weights=True`` it is already
    bmm + softmax).
    Why: the ONNX exporter lowers a boolean-masked SDPA with ``IsNaN`` + ``Where``
    (its safe softmax), which the NNAPI and Core ML EPs do not take (two partitions), and litert-torch
    adds SELECT_V2 for ``is_causal``; coremltools' SDPA lowering failed for DETR's nn.Transformer
    (#2155). The explicit matmul-softmax-matmul in (B, H, N, D) with softmax on the last axis is
    what every backend runs (R1/R3).
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
