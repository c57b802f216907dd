"""``finite_masks``: -inf / finfo.min attention-mask values that reach a softmax made finite (-1e4).

Like every attention-related pass, it matches plain ATen patterns (any model, not only the zoo) and
leaves a site alone when a shape, a dtype or a constant it needs is unknown. The mask value and the
SDPA argument helpers are shared with ``sdpa_to_explicit`` (``attention.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from edgevit.export.passes import register_pass
from edgevit.export.passes.attention import MASK_VALUE, _is_float, _sdpa_mask
from edgevit.export.passes.base import GraphPass, PassContext, aten, is_op

#: Mask values at or below this overflow to -inf in float16 once a logit is added (finfo(fp16).min).
_FP16_MIN = float(torch.finfo(torch.float16).min)

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
