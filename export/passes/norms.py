"""Norms and reductions: fold or decompose the normalisations and sums an accelerator lacks."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import fx

from edgevit.export.passes import register_pass
from edgevit.export.passes.repairs import dynamic_dims
from edgevit.export.passes.base import GraphPass, PassContext, aten, is_op


def _float_tensor(ctx: PassContext, node: Any) -> torch.Tensor | None:
    """The meta value of ``node`` when it is a floating-point tensor of known shape, else None."""
    v = ctx.val(node)
    return v if isinstance(v, torch.Tensor) and v.is_floating_point() else None


def _statistics_dtype_ok(ctx: PassContext, node: Any) -> bool:
    """fp32/fp64 only. torch's layer/group/vector norms of fp16/bf16 tensors accumulate in fp32; the
    primitives would square in fp16 (overflow to inf from |x - mean| ~ 256) or sum in bf16."""
    v = _float_tensor(ctx, node)
    return v is not None and v.dtype in (torch.float32, torch.float64)


def _normalise(ctx: PassContext, x: fx.Node, dims: list[int], eps: float) -> fx.Node:
    """``(x - mean) / sqrt(var + eps)`` over ``dims`` with ReduceMean/Sub/Mul/Add/Sqrt/Div only.

    The two-pass (mean, then mean of squared deviations) form is what torch computes, so the
    result agrees to fp32 rounding; Sqrt + Div because NNAPI's list has no Rsqrt/Reciprocal.
    """
    mean = ctx.call(aten.mean.dim, x, dims, True)
    centred = ctx.call(aten.sub.Tensor, x, mean)
    var = ctx.call(aten.mean.dim, ctx.call(aten.mul.Tensor, centred, centred), dims, True)
    std = ctx.call(aten.sqrt.default, ctx.call(aten.add.Tensor, var, float(eps)))
    return ctx.call(aten.div.Tensor, centred, std)


def _affine(ctx: PassContext, y: fx.Node, weight: Any, bias: Any, shape: Sequence[int] | None = None) -> fx.Node:
    """``y * weight + bias`` (either may be None); ``shape`` reshapes them to broadcast first."""
    for param, op in ((weight, aten.mul.Tensor), (bias, aten.add.Tensor)):
        if param is None:
            continue
        if shape is not None:
            value = ctx.constant(param)
            param = (ctx.add_constant(value.reshape(shape), "norm_affine") if value is not None
                     else ctx.call(aten.reshape.default, param, list(shape)))
        y = ctx.call(op, y, param)
    return y


def _is_param(node: Any) -> bool:
    """None (no affine) or a tensor node."""
    return node is None or isinstance(node, fx.Node)


@register_pass
class DecomposeLayerNorm(GraphPass):
    """``aten.layer_norm`` → mean, sub, mul, mean, add eps, sqrt, div, mul weight, add bias.

    Why: ONNX exports it as LayerNormalization (opset 17+), which is not in ORT's NNAPI op list
    (nnapi_supported_ops.md), so each LayerNorm of a ViT is a separate CPU island; TFLite has no
    LayerNorm builtin either. ReduceMean, Sub, Mul, Add, Sqrt and
    Div are all NNAPI ops. Exact up to fp32 rounding (same two-pass statistics as torch). fp32/fp64
    inputs only: torch computes an fp16 norm's statistics in fp32, the primitives would overflow.
    """

    name = "decompose_layer_norm"
    exact = True
    fixes = ("LayerNormalization", "layer_norm")

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        if not is_op(node, aten.layer_norm) or not _statistics_dtype_ok(ctx, node.args[0]):
            return False
        shape, rank = node.args[1], ctx.rank(node.args[0])
        weight, bias, _ = _norm_args(node)
        return (isinstance(shape, (list, tuple)) and 0 < len(shape) <= rank
                and _is_param(weight) and _is_param(bias))

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        x, shape = node.args[0], node.args[1]
        weight, bias, eps = _norm_args(node)
        rank = ctx.rank(x)
        dims = list(range(rank - len(shape), rank))
        ctx.replace(node, _affine(ctx, _normalise(ctx, x, dims, eps), weight, bias))


def _norm_args(node: fx.Node) -> tuple[Any, Any, float]:
    """(weight, bias, eps) of a layer_norm / group_norm call: positions 2, 3, 4 in both."""
    args = list(node.args) + [None] * (5 - len(node.args))
    return args[2], args[3], 1e-5 if args[4] is None else args[4]


@register_pass
class DecomposeGroupNorm(GraphPass):
    """``aten.group_norm`` → reshape (B, G, -1), mean/var primitives, reshape back, per-channel affine.

    Why: the ONNX exporter writes group_norm as Reshape → InstanceNormalization → Reshape (also
    ``group_norm(x, 1, ...)``, the "LayerNorm over C,H,W" of MobileViT v2 / PoolFormer), and
    InstanceNormalization is not in ORT's NNAPI op list. litert-torch lowers group_norm with one
    BROADCAST_TO per site, which the LiteRT GPU delegate rejects (LiteRT#9191; 21 sites in
    mobilevit_v2_050). The replacement uses ReduceMean, Sub, Mul, Add, Sqrt, Div, Reshape only, with
    rank-matched broadcasting. Inputs of rank 2-4 (rank 5 is beyond NNAPI anyway), fp32/fp64 (as
    ``decompose_layer_norm``). Exact up to fp32 rounding.
    """

    name = "decompose_group_norm"
    exact = True
    fixes = ("InstanceNormalization", "GroupNormalization", "group_norm")

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        if not is_op(node, aten.group_norm) or not _statistics_dtype_ok(ctx, node.args[0]):
            return False
        shape, groups = ctx.shape(node.args[0]), node.args[1]
        weight, bias, _ = _norm_args(node)
        return (2 <= len(shape) <= 4 and isinstance(groups, int) and groups > 0
                and shape[1] % groups == 0 and math.prod(shape) > 0
                and _is_param(weight) and _is_param(bias) and not dynamic_dims(ctx, node.args[0]))

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        x, groups = node.args[0], node.args[1]
        weight, bias, eps = _norm_args(node)
        shape = ctx.shape(x)
        grouped = ctx.call(aten.reshape.default, x, [shape[0], groups, math.prod(shape[1:]) // groups])
        y = ctx.call(aten.reshape.default, _normalise(ctx, grouped, [2], eps), list(shape))
        channel = [1, shape[1]] + [1] * (len(shape) - 2)  # (1, C, 1, 1) for NCHW
        ctx.replace(node, _affine(ctx, y, weight, bias, channel))


@register_pass
class SumToMean(GraphPass):
    """``aten.sum`` over static dims → ``mean`` × N (N the number of elements summed).

    Why: ReduceSum is not in ORT's NNAPI op list (nnapi_supported_ops.md); ReduceMean is. Only
    floating-point sums with the input's dtype (an integer or dtype-changing sum is left alone), over
    dims whose size does not depend on the data (N is a constant: ``x[mask].sum(0)`` is left alone).
    Exact up to rounding: one extra rounding of the mean (torch's mean is sum / N); bit-exact when
    N is a power of two.
    """

    name = "sum_to_mean"
    exact = True
    fixes = ("ReduceSum", "SUM")

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        if not is_op(node, aten.sum) or node.target not in (aten.sum.dim_IntList, aten.sum.default):
            return False
        x, out = _float_tensor(ctx, node.args[0]), _float_tensor(ctx, node)
        if x is None or out is None or x.dtype != out.dtype or x.numel() == 0 or x.dim() == 0:
            return False
        dims = self._dims(node, x.dim())
        return dims is not None and not dynamic_dims(ctx, node.args[0], dims)  # N is baked in

    @staticmethod
    def _dims(node: fx.Node, rank: int) -> list[int] | None:
        """The reduced dims, normalised (all dims for ``sum(x)`` / ``dim=None`` / ``dim=[]``)."""
        if node.target is aten.sum.default:
            return list(range(rank))
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            return list(range(rank))
        if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
            return None
        return sorted({d % rank for d in dims})

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        x = node.args[0]
        shape = ctx.shape(x)
        dims = self._dims(node, len(shape))
        keepdim = False
        if node.target is aten.sum.dim_IntList:
            keepdim = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        count = math.prod(shape[d] for d in dims)
        mean = ctx.call(aten.mean.dim, x, dims, keepdim)
        ctx.replace(node, ctx.call(aten.mul.Tensor, mean, float(count)))


# --- batch norm -----------------------------------------------------------------------------------

_FOLD_INTO = (aten.conv1d, aten.conv2d, aten.conv3d, aten.linear)


@register_pass
class FoldBatchNorm(GraphPass):
    """Eval ``aten.batch_norm`` → folded into the conv/linear before it, else ``x * scale + shift``.

    Why: the Core ML execution provider has no BatchNormalization in its MLProgram op list
    (coreml_supported_mlprogram_ops.md). The ONNX exporter already folds a BatchNorm that directly
    follows a Conv/Gemm, but a BatchNorm on a flattened tensor, after an activation, on a linear's
    (B, N, C) output or on attention maps (DeepViT's re-attention) stays and cuts a Core ML partition.
    Folding into the preceding conv1d/2d/3d or rank-2 linear (constant weights, BN its only user)
    removes the op on every target; anything else becomes a Mul and an Add with constants shaped
    (1, C, 1, ...) to broadcast on the channel axis. Only when training=False and the running stats,
    weight and bias are constants. Exact up to fp32 re-association (folded in float64).
    """

    name = "fold_batchnorm"
    exact = True
    fixes = ("BatchNormalization", "batch_norm")

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        if not is_op(node, aten.batch_norm) or len(node.args) < 8 or node.args[5] is not False:
            return False
        x = _float_tensor(ctx, node.args[0])
        return x is not None and x.dim() >= 2 and self._scale_shift(ctx, node) is not None

    @staticmethod
    def _scale_shift(ctx: PassContext, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-channel (scale, shift) in float64 with bn(x) = x*scale + shift, or None if not constant."""
        weight, bias, mean, var = node.args[1:5]
        mean, var = ctx.constant(mean), ctx.constant(var)
        if mean is None or var is None:
            return None
        w = torch.ones_like(mean) if weight is None else ctx.constant(weight)
        b = torch.zeros_like(mean) if bias is None else ctx.constant(bias)
        channels = ctx.shape(node.args[0])[1]
        if w is None or b is None or any(t.shape != (channels,) for t in (w, b, mean, var)):
            return None
        scale = w.double() / torch.sqrt(var.double() + float(node.args[7]))
        return scale, b.double() - mean.double() * scale

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        scale, shift = self._scale_shift(ctx, node)
        x = node.args[0]
        folded = self._fold(ctx, x, scale, shift)
        if folded is not None:
            ctx.replace(node, folded)
            return
        dtype, rank = ctx.val(x).dtype, ctx.rank(x)
        shape = [1, scale.numel()] + [1] * (rank - 2)
        s = ctx.add_constant(scale.to(dtype).reshape(shape), "bn_scale")
        t = ctx.add_constant(shift.to(dtype).reshape(shape), "bn_shift")
        ctx.replace(node, ctx.call(aten.add.Tensor, ctx.call(aten.mul.Tensor, x, s), t))

    @staticmethod
    def _fold(ctx: PassContext, prod: Any, scale: torch.Tensor, shift: torch.Tensor) -> fx.Node | None:
        """A copy of the producing conv/linear with the BN folded into its weight and bias, or None."""
        if not is_op(prod, *_FOLD_INTO) or len(prod.users) != 1 or "bias" in prod.kwargs:
            return None
        if is_op(prod, aten.linear) and ctx.rank(prod) != 2:  # BN's channel axis 1 != features axis -1
            return None
        # an unbatched conv ((C, L) from conv1d) has its channels on axis 0, where BN sees the batch
        batched = {aten.conv1d: 3, aten.conv2d: 4, aten.conv3d: 5}
        if any(is_op(prod, op) and ctx.rank(prod) != rank for op, rank in batched.items()):
            return None
        weight = ctx.constant(prod.args[1])
        bias_arg = prod.args[2] if len(prod.args) > 2 else None
        bias = None if bias_arg is None else ctx.constant(bias_arg)
        if weight is None or (bias_arg is not None and bias is None) or weight.shape[0] != scale.numel():
            return None
        # W' = W * scale (per output channel), b' = b * scale + shift; computed in float64.
        w = weight.double() * scale.reshape([-1] + [1] * (weight.dim() - 1))
        b = (bias.double() if bias is not None else torch.zeros_like(scale)) * scale + shift
        args = list(prod.args)
        args[1] = ctx.add_constant(w.to(weight.dtype), "bn_folded_weight")
        b_node = ctx.add_constant(b.to(weight.dtype), "bn_folded_bias")
        args[2:3] = [b_node]
        return ctx.call(prod.target, *args, **prod.kwargs)


@register_pass
class DecomposeVectorNorm(GraphPass):
    """``aten.linalg_vector_norm`` (ord 2, static dims) → ``sqrt(mean(x * x) * N)``.

    Why: ``F.normalize`` and cosine-similarity attention (GLNet's slot clustering) export as ONNX
    ReduceL2, which is in neither ORT's NNAPI nor its Core ML (MLProgram) op list: every site cuts
    the graph into a new CPU island (glnet_4g: 34 sites, 18 partitions on both). Mul, ReduceMean, Mul
    and Sqrt are in both lists; ReduceMean × N rather than ReduceSum because NNAPI lacks ReduceSum
    (see ``sum_to_mean``). Only the 2-norm of an fp32/fp64 tensor without a ``dtype`` override (torch
    accumulates an fp16 norm in fp32; x * x in fp16 overflows from |x| = 256).
    Exact up to fp32 rounding (one extra rounding for the mean; none when N is a power of two). Like
    torch's CPU kernel it does not rescale, so the underflow/overflow range is the same (|x| within
    about 1e-19..1e19 in fp32).
    """

    name = "decompose_vector_norm"
    exact = True
    fixes = ("ReduceL2", "linalg_vector_norm")

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        if node.target is not aten.linalg_vector_norm.default or node.kwargs.get("dtype") is not None:
            return False
        x, out = _float_tensor(ctx, node.args[0]), _float_tensor(ctx, node)
        if x is None or out is None or x.dtype != out.dtype or x.numel() == 0 or x.dim() == 0:
            return False
        if not _statistics_dtype_ok(ctx, node.args[0]) or self._ord(node) != 2:
            return False
        dims = self._dims(node, x.dim())
        return dims is not None and not dynamic_dims(ctx, node.args[0], dims)  # N is baked in

    @staticmethod
    def _ord(node: fx.Node) -> Any:
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("ord", 2)

    @staticmethod
    def _dims(node: fx.Node, rank: int) -> list[int] | None:
        """The reduced dims, normalised; all dims for ``dim=None``."""
        dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if dims is None:
            return list(range(rank))
        if isinstance(dims, int):
            dims = [dims]
        if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
            return None
        return sorted({d % rank for d in dims}) or list(range(rank))

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        x = node.args[0]
        shape = ctx.shape(x)
        dims = self._dims(node, len(shape))
        keepdim = bool(node.args[3] if len(node.args) > 3 else node.kwargs.get("keepdim", False))
        count = math.prod(shape[d] for d in dims)
        squares = ctx.call(aten.mul.Tensor, x, x)
        mean = ctx.call(aten.mean.dim, squares, dims, keepdim)
        ctx.replace(node, ctx.call(aten.sqrt.default, ctx.call(aten.mul.Tensor, mean, float(count))))
