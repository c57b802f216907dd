"""``ane_split_heads``: per-head ("split") attention for the Apple Neural Engine.

Apple's ml-ane-transformers computes multi-head attention one head at a time on channels-first
rank-4 tensors: q, k and v are split into per-head (B, d/h, 1, S) chunks, the scores of each head are
``einsum('bchq,bkhc->bkhq', q_h, k_h)`` — a (B, S_k, 1, S_q) map whose softmax runs over dim 1 — and
``einsum('bkhq,bchk->bchq', w_h, v_h)`` gives the head's output, concatenated on dim 1. Apple's two
reasons: chunking the large (B, H, S, S) intermediates keeps each head's working set in the ANE's
L2 cache ("Principle 2"), and the two einsum equations lower to MIL ``einsum`` ops the ANE runs
without transposing the attention maps ("Principle 3"). The vision repo calls it ``split_softmax``
and enables it by default because it "reduces latency significantly".

The pass rewrites the batched form every capture produces after ``sdpa_to_explicit``::

    scores = Q @ KT  (B, H, Sq, Sk);  scores = scores (*|/|+|-) operand ...;  w = softmax(scores, -1)
    out = w @ V      (B, H, Sq, D)

into that per-head form. ``ane_cancel_transposes`` (next in the Core ML pipeline) then reads each
q/k/v chunk straight out of the (B, 3C, 1, S) projection conv and the concatenated output straight
into the output conv, so no transpose of the token tensor remains around the attention core.

Prediction cannot run on Linux: the tests show the equivalence in PyTorch and the structure of the
converted MIL program (per-head einsums, softmax on axis 1 of rank-4 maps). The latency benefit is
Apple's published claim, not measured here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from edgevit.export.passes import register_pass
from edgevit.export.passes.repairs import ViewRepairing
from edgevit.export.passes.base import GraphPass, PassContext, aten, is_op

#: Apple's equations (ane_transformers/reference/multihead_attention.py); coremltools maps both to
#: MIL ``einsum`` (checked in the tests), other spellings fall back to transposes + matmul.
SCORES_EQUATION = "bchq,bkhc->bkhq"
OUTPUT_EQUATION = "bkhq,bchk->bchq"

_SOFTMAX = (aten.softmax.int, aten._softmax.default)
_ELEMENTWISE = (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar,
                aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar)
_COMMUTATIVE = (aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar)


@dataclass
class _Attention:
    """One batched attention core: ``softmax(chain(q @ kt)) @ v``, with every tensor rank 4."""

    q: fx.Node  # (B, H, Sq, D)
    kt: fx.Node  # (B, H, D, Sk)
    v: fx.Node  # (B, H, Sk, Dv)
    chain: list[tuple[fx.Node, fx.Node]]  # (element-wise op, the chain value it reads), first first
    heads: int


def _is_float4(ctx: PassContext, node: Any) -> bool:
    v = ctx.val(node)
    return isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == 4


def _softmax_last(ctx: PassContext, node: Any) -> bool:
    if not is_op(node, *_SOFTMAX) or len(node.users) != 1 or not _is_float4(ctx, node):
        return False
    if node.target is aten._softmax.default and node.args[2]:
        return False  # half_to_float changes the dtype
    if node.target is aten.softmax.int and (len(node.args) > 2 and node.args[2] is not None
                                           or node.kwargs.get("dtype") is not None):
        return False
    return node.args[1] in (-1, 3)


def _chain_operand_ok(ctx: PassContext, node: fx.Node, on_chain: fx.Node) -> bool:
    """An element-wise op whose result has the scores' shape, reading ``on_chain`` once: arithmetic
    with the chain operand first (or either for add/mul) and a number or a tensor of rank <= 4
    broadcasting into the scores; or ``masked_fill(scores, mask, number)`` (a causal / padding mask)."""
    if node.kwargs or ctx.shape(node) != ctx.shape(on_chain):
        return False
    if is_op(node, aten.masked_fill) and len(node.args) == 3:
        mask, value = node.args[1], node.args[2]
        return (node.args[0] is on_chain and isinstance(value, (int, float))
                and isinstance(mask, fx.Node) and 0 < (ctx.rank(mask) or 0) <= 4)
    if not is_op(node, *_ELEMENTWISE) or len(node.args) != 2:
        return False
    a, b = node.args
    if a is b or (a is not on_chain and (b is not on_chain or node.target not in _COMMUTATIVE)):
        return False
    other = b if a is on_chain else a
    if isinstance(other, (int, float)):
        return True
    return isinstance(other, fx.Node) and 0 < (ctx.rank(other) or 0) <= 4


def _walk_back(ctx: PassContext, node: Any, depth: int = 0) -> tuple[fx.Node, list[tuple[fx.Node, fx.Node]]] | None:
    """From the softmax input back to the scores matmul: (matmul, [(op, chain value it reads)...])."""
    if is_op(node, aten.matmul):
        return node, []
    if not isinstance(node, fx.Node) or len(node.users) != 1 or depth >= 8:
        return None
    for prev in node.args[:2]:
        if isinstance(prev, fx.Node) and _chain_operand_ok(ctx, node, prev):
            found = _walk_back(ctx, prev, depth + 1)
            if found is not None:
                return found[0], found[1] + [(node, prev)]
    return None


def _find(ctx: PassContext, out: fx.Node) -> _Attention | None:
    """The attention core ending at the matmul ``out`` = ``softmax(...) @ v``, or None."""
    if not is_op(out, aten.matmul) or len(out.args) != 2 or not _is_float4(ctx, out):
        return None
    w, v = out.args
    if not _softmax_last(ctx, w) or not _is_float4(ctx, v):
        return None
    found = _walk_back(ctx, w.args[0])
    if found is None:
        return None
    scores, chain = found
    if len(scores.users) != 1 or len(scores.args) != 2:
        return None
    q, kt = scores.args
    if not (_is_float4(ctx, q) and _is_float4(ctx, kt)):
        return None
    (b, h, sq, d), (_, _, d2, sk), (_, _, sk2, _) = ctx.shape(q), ctx.shape(kt), ctx.shape(v)
    batch = {tuple(ctx.shape(t)[:2]) for t in (q, kt, v)}
    if batch != {(b, h)} or d2 != d or sk2 != sk or ctx.shape(scores) != (b, h, sq, sk):
        return None
    return _Attention(q, kt, v, chain, h)


def _head(ctx: PassContext, x: fx.Node, h: int) -> fx.Node:
    """Head ``h`` of a (B, H, M, N) tensor as (B, N, 1, M): slice dim 1, then move N to dim 1."""
    return ctx.call(aten.permute.default, ctx.call(aten.slice.Tensor, x, 1, h, h + 1), [0, 3, 1, 2])


def _operand_head(ctx: PassContext, operand: Any, h: int, heads: int) -> Any:
    """The other operand of a chain op, as seen by head ``h`` in the (B, Sk, 1, Sq) layout."""
    if not isinstance(operand, fx.Node):
        return operand
    shape = list(ctx.shape(operand))
    if len(shape) < 4:
        operand = ctx.call(aten.reshape.default, operand, [1] * (4 - len(shape)) + shape)
        shape = [1] * (4 - len(shape)) + shape
    if shape[1] == heads and heads > 1:
        operand = ctx.call(aten.slice.Tensor, operand, 1, h, h + 1)
    return ctx.call(aten.permute.default, operand, [0, 3, 1, 2])


@register_pass
class AneSplitHeads(ViewRepairing, GraphPass):
    """Batched attention ``softmax(q @ kt) @ v`` on (B, H, S, D) → per-head ANE einsums, softmax on dim 1.

    Why: Apple's ml-ane-transformers "Principle 2: Chunking Large
    Intermediate Tensors": one single-head attention per head on channels-first chunks, scores
    ``einsum('bchq,bkhc->bkhq')`` (B, Sk, 1, Sq) with the softmax over dim 1, output
    ``einsum('bkhq,bchk->bchq')``, heads concatenated on dim 1 — the ANE keeps each head's maps in
    its L2 cache and never transposes them. The batched form is a rank-4 matmul with a softmax over
    the last axis of a (B, H, Sq, Sk) tensor. Matches when all of q, kt, v are rank 4 with the same
    (B, H), the softmax has one reader (the output matmul) and the ops between the scores and the
    softmax are element-wise with a number or a broadcasting tensor (scale, attention bias, finite
    mask or ``masked_fill``; per-head slices of the bias). Re-attention that mixes heads after the softmax (DeepViT) is
    left batched. Exact up to fp32 re-association (the same products, summed by einsum).
    """

    name = "ane_split_heads"
    exact = True
    fixes = ("batched attention",)  # the layout hint of ``edgevit inspect`` for coreml:ane

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        return _find(ctx, node) is not None

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        att = _find(ctx, node)
        outputs = [self._one_head(ctx, att, h) for h in range(att.heads)]
        joined = outputs[0] if len(outputs) == 1 else ctx.call(aten.cat.default, outputs, 1)
        b, h, sq, dv = ctx.shape(node)
        # (B, H*Dv, 1, Sq) back to the batched (B, H, Sq, Dv); ane_cancel_transposes removes this
        # when the reader turns it straight back into (B, C, 1, S).
        batched = ctx.call(aten.reshape.default, joined, [b, h, dv, sq])
        ctx.replace(node, ctx.call(aten.transpose.int, batched, 2, 3))

    @staticmethod
    def _one_head(ctx: PassContext, att: _Attention, h: int) -> fx.Node:
        q_h = _head(ctx, att.q, h)  # (B, D, 1, Sq)
        k_h = _head(ctx, att.kt, h)  # (B, Sk, 1, D): Apple's k.transpose(1, 3) chunk
        v_h = _head(ctx, att.v, h)  # (B, Dv, 1, Sk)
        scores = ctx.call(aten.einsum.default, SCORES_EQUATION, [q_h, k_h])  # (B, Sk, 1, Sq)
        for op, prev in att.chain:
            args = [scores if x is prev else _operand_head(ctx, x, h, att.heads) for x in op.args]
            scores = ctx.call(op.target, *args)
        weights = ctx.call(aten.softmax.int, scores, 1)
        return ctx.call(aten.einsum.default, OUTPUT_EQUATION, [weights, v_h])  # (B, Dv, 1, Sq)

