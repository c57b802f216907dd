"""Resampling with static structure: adaptive pools and nearest up-sampling as fixed-size ops."""

from __future__ import annotations

import math
import operator

import torch
from torch import fx

from edgevit.export.passes import register_pass
from edgevit.export.passes.repairs import ViewRepairing
from edgevit.export.passes.base import Aliasing, GraphPass, PassContext, aten, is_op


def adaptive_bins(size_in: int, size_out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive-pool bins: bin i covers [floor(i*n/o), ceil((i+1)*n/o)).

    Bins overlap when n/o is not an integer, and repeat input elements when o > n (up-sampling).
    """
    return [((i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)) for i in range(size_out)]


def adaptive_avg_matrix(size_in: int, size_out: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (size_out, size_in) matrix ``A`` with ``adaptive_avg_pool1d(x, size_out) == x @ A.T``."""
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    for i, (start, end) in enumerate(adaptive_bins(size_in, size_out)):
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix.to(dtype)


def _spatial(ctx: PassContext, node: fx.Node, dims: int) -> tuple[list[int], list[int]] | None:
    """(input sizes, output sizes) of the last ``dims`` axes, if both are static ints."""
    val = ctx.val(node)
    val = val[0] if isinstance(val, (tuple, list)) else val  # (values, indices) of a max pool
    src_shape = ctx.shape(node.args[0])
    out_shape = tuple(val.shape) if isinstance(val, torch.Tensor) else None
    if src_shape is None or out_shape is None or len(src_shape) not in (dims + 1, dims + 2):
        return None
    sizes_in, sizes_out = list(src_shape[-dims:]), list(out_shape[-dims:])
    if not all(isinstance(s, int) and s > 0 for s in sizes_in + sizes_out):
        return None
    return sizes_in, sizes_out


def _only_values_used(node: fx.Node) -> bool:
    """For a (values, indices) op: True when nothing reads the indices."""
    return all(u.target is operator.getitem and (u.args[1] == 0 or not u.users) for u in node.users)


@register_pass
class AdaptivePoolStatic(ViewRepairing, GraphPass):
    """``adaptive_avg_pool{1,2}d`` → ``mean`` / ``avg_pool2d`` / two constant averaging matmuls.

    Why: an adaptive pool whose input is not an integer multiple of its output (FilterViT-xxs pools
    110→20 and back 20→110) has a different window per output element. The ONNX exporter lowers it to
    Transpose + ``GatherND`` + ``Where`` + a ``Gather``/``Add`` per kernel offset + ``Div`` (NNAPI has no
    GatherND/Where; the Core ML EP has no Gather and these tensors are above its rank 5, §6.4), the
    TFLite converter to BROADCAST_TO + GATHER_ND + SELECT + a SLICE/ADD per offset (none of them XNNPACK
    ops, §4.3), and coremltools to a slice + mean per bin, whose MIL passes crawl (filtervit_xxs →
    coreml does not finish in 28 min, ``known_failures.py``). Every bin is
    a rectangle, so the average factorises: ``out = A_h @ x @ A_w^T`` with constant (o × n) matrices
    whose row i averages PyTorch's bin i (overlapping/repeating bins included): two rank-≤4 MatMuls
    with a constant 2-D right operand (plus two transposes to reach the H axis).
    Integer ratios become ``avg_pool2d(kernel = stride = n/o)`` and a global pool ``mean`` (what the
    converters already emit for those). ``adaptive_max_pool2d`` is rewritten only in the integer case
    (``max_pool2d`` / ``amax``) and when its indices are unused; the non-integer max stays.
    Exact for avg_pool/mean/max; the matmul form is exact up to fp32 rounding of the 1/k weights and
    the re-associated sums (|Δ| ≤ (k_h·k_w + k_h + k_w + 2)·eps·max|x| for bins of k_h × k_w).
    The matmul form's result is a transposed view; a later ``view`` that needs the pool's contiguous
    strides (``pool(x).view(B, -1)``) becomes a ``reshape``. A pool to its own input size is the input
    itself, except where an in-place op writes either (the pool's copy keeps them apart): left alone.
    """

    name = "adaptive_pool_static"
    fixes = ("adaptive_avg_pool2d", "adaptive_avg_pool1d", "GatherND", "Where", "Gather", "GATHER_ND")

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        val = ctx.val(node)
        if is_op(node, aten.adaptive_max_pool2d):
            sizes = _spatial(ctx, node, 2)
            return (sizes is not None and _only_values_used(node)
                    and all(n % o == 0 for n, o in zip(*sizes)) and not self._aliased_identity(ctx, node, sizes))
        if not isinstance(val, torch.Tensor) or not val.dtype.is_floating_point:
            return False
        if is_op(node, aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d):
            sizes = _spatial(ctx, node, 2)
        elif is_op(node, aten.adaptive_avg_pool1d):
            sizes = _spatial(ctx, node, 1)
        else:
            return False
        return sizes is not None and not self._aliased_identity(ctx, node, sizes)

    @staticmethod
    def _aliased_identity(ctx: PassContext, node: fx.Node, sizes: tuple[list[int], list[int]]) -> bool:
        """An identity pool (replaced by its input) whose input or output an in-place op writes."""
        if sizes[0] != sizes[1]:
            return False
        writes = Aliasing.of(ctx)  # a max pool's getitem items share its group
        return writes.written(node.args[0]) or writes.written(node)

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        src = node.args[0]
        if is_op(node, aten.adaptive_max_pool2d):
            self._max(ctx, node, src)
            return
        dims = 1 if is_op(node, aten.adaptive_avg_pool1d) else 2
        sizes_in, sizes_out = _spatial(ctx, node, dims)
        axes = list(range(-dims, 0))
        if sizes_in == sizes_out:
            out = src
        elif all(o == 1 for o in sizes_out):
            out = ctx.call(aten.mean.dim, src, axes, True)
        elif dims == 2 and all(n % o == 0 for n, o in zip(sizes_in, sizes_out)):
            kernel = [n // o for n, o in zip(sizes_in, sizes_out)]
            out = ctx.call(aten.avg_pool2d.default, src, kernel, kernel)
        else:  # 1-D AveragePool is not in the Core ML EP list either: matmul for every 1-D ratio
            out = self._matmuls(ctx, src, sizes_in, sizes_out, ctx.val(node).dtype)
        ctx.replace(node, out)

    @staticmethod
    def _matmuls(ctx: PassContext, src: fx.Node, sizes_in: list[int], sizes_out: list[int],
                 dtype: torch.dtype) -> fx.Node:
        """``A_h @ x @ A_w^T`` with every constant on the right of its MatMul (a 2-D weight: TFLite
        FULLY_CONNECTED, the Core ML EP's NeuralNetwork MatMul); the H axis is reached by a transpose.
        An axis whose size does not change is skipped (its A is the identity)."""
        def pool_last(x: fx.Node, n: int, o: int, hint: str) -> fx.Node:
            weight = ctx.add_constant(adaptive_avg_matrix(n, o, dtype).T.contiguous(), hint)
            return ctx.call(aten.matmul.default, x, weight)

        def pool_rows(x: fx.Node, n: int, o: int) -> fx.Node:
            flipped = ctx.call(aten.transpose.int, x, -1, -2)
            return ctx.call(aten.transpose.int, pool_last(flipped, n, o, "adaptive_pool_h"), -1, -2)

        (n_h, n_w), (o_h, o_w) = ([1] * (2 - len(sizes_in)) + sizes_in, [1] * (2 - len(sizes_out)) + sizes_out)
        if n_h == o_h:
            return pool_last(src, n_w, o_w, "adaptive_pool_w")
        if n_w == o_w:
            return pool_rows(src, n_h, o_h)
        # W first transposes (H x o_w) and the output, H first the input and (W x o_h): the smaller pair
        if n_h * o_w + o_h * o_w <= n_h * n_w + n_w * o_h:
            return pool_rows(pool_last(src, n_w, o_w, "adaptive_pool_w"), n_h, o_h)
        return pool_last(pool_rows(src, n_h, o_h), n_w, o_w, "adaptive_pool_w")

    @staticmethod
    def _max(ctx: PassContext, node: fx.Node, src: fx.Node) -> None:
        sizes_in, sizes_out = _spatial(ctx, node, 2)
        if sizes_in == sizes_out:
            values = src
        elif sizes_out == [1, 1]:
            values = ctx.call(aten.amax.default, src, [-2, -1], True)
        else:
            kernel = [n // o for n, o in zip(sizes_in, sizes_out)]
            values = ctx.call(aten.max_pool2d.default, src, kernel, kernel)
        for user in list(node.users):
            if user.args[1] == 0:
                ctx.replace(user, values)


# --- nearest up-sampling ---------------------------------------------------------------------------

_NEAREST_OPS = (aten.upsample_nearest2d, aten.upsample_nearest1d, aten._upsample_nearest_exact2d,
                aten._upsample_nearest_exact1d)


def _repeat_factors(ctx: PassContext, node: fx.Node, dims: int) -> list[int] | None:
    """Per-axis integer factors r with ``out[i] = in[i // r]``, read off the op itself; else None.

    The source index of every output position is measured by running the node's own op on an index
    ramp, so float scale rounding, ``nearest`` vs ``nearest-exact`` and size-vs-scale arguments are
    whatever PyTorch does; anything that is not a plain integer repeat is left alone.
    """
    sizes = _spatial(ctx, node, dims)
    if sizes is None:
        return None
    sizes_in, sizes_out = sizes
    factors = []
    for axis, (n, o) in enumerate(zip(sizes_in, sizes_out)):
        line = source_index(node, axis, sizes_in, sizes_out) if o % n == 0 else None
        if line is None or not torch.equal(line, torch.arange(o, dtype=torch.float32) // (o // n)):
            return None
        factors.append(o // n)
    return factors


def source_index(node: fx.Node, axis: int, sizes_in: list[int], sizes_out: list[int]) -> torch.Tensor | None:
    """For a resize ``node``: the input position each output position reads along spatial ``axis``,
    measured by running the node's own op on an index ramp (None if the op gives another output size)."""
    view = [1] * len(sizes_in)
    view[axis] = sizes_in[axis]
    ramp = torch.arange(sizes_in[axis], dtype=torch.float32).reshape(view).expand(sizes_in).reshape(1, 1, *sizes_in)
    probe = node.target(ramp, *node.args[1:], **node.kwargs)
    if list(probe.shape[2:]) != sizes_out:
        return None
    return probe.movedim(2 + axis, -1).reshape(-1, sizes_out[axis])[0]


def _repeat_axis(ctx: PassContext, x: fx.Node, axis: int, r: int) -> fx.Node:
    """Repeat every element of ``axis`` ``r`` times with rank-4 reshape + concat (no Expand/Tile/Gather)."""
    shape = list(ctx.shape(x))
    axis %= len(shape)
    outer, inner = math.prod(shape[:axis + 1]), math.prod(shape[axis + 1:])
    flat = ctx.call(aten.reshape.default, x, [1, outer, 1, inner])
    copies = ctx.call(aten.cat.default, [flat] * r, 2)  # (1, outer, r, inner)
    shape[axis] *= r
    return ctx.call(aten.reshape.default, copies, shape)


@register_pass
class UpsampleStatic(GraphPass):
    """Integer-factor nearest up-sampling (``upsample_nearest{1,2}d``) → reshape + concat copies.

    Why: the ONNX exporter writes ``F.interpolate(mode="nearest")`` as ``Resize(x, "", scales)``, and
    onnxruntime's mobile usability checker counts the omitted optional ``roi`` input ("") as a value of
    unknown shape, so the NNAPI and Core ML EPs are reported "unsupported due to dynamic input" for
    every Resize (dropoutvit_xs: 3 nodes). NNAPI has no Expand/Tile and the Core ML EP no ``Gather``,
    so ``repeat_interleave``/``expand`` do not help; a rank-4 ``Reshape → Concat(r copies) → Reshape``
    per axis is supported by both (pure data movement, dim 0 kept at 1). The checker may be stricter
    than the on-device EPs here (neither EP runs on Linux, so that cannot be checked).
    Only the ONNX mobile EPs want it: TFLite, Core ML and OpenVINO lower nearest resize to one native op.
    Exact (pure data movement, ``torch.equal``).
    """

    name = "upsample_static"
    fixes = ("Resize",)

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        if not is_op(node, *_NEAREST_OPS):
            return False
        dims = 1 if is_op(node, aten.upsample_nearest1d, aten._upsample_nearest_exact1d) else 2
        return _repeat_factors(ctx, node, dims) is not None

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        dims = 1 if is_op(node, aten.upsample_nearest1d, aten._upsample_nearest_exact1d) else 2
        out = node.args[0]
        for axis, r in zip(range(-dims, 0), _repeat_factors(ctx, node, dims)):
            if r > 1:
                out = _repeat_axis(ctx, out, axis, r)
        ctx.replace(node, out)
