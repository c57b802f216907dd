"""Layout passes: im2col/col2im and ``pixel_unshuffle`` rewritten at rank ≤ 4.

Both are pure data movement (or a one-hot convolution that only copies and sums), so every rewrite is
exact. The general rank lowering of data-movement chains (``lower_rank``) is in ``rank.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import fx

from edgevit.export.passes import register_pass
from edgevit.export.passes.base import Aliasing, GraphPass, PassContext, aten, is_op

# --- one-hot kernels: im2col / col2im as (transposed) depthwise convolutions -------------------------


def one_hot_kernel(channels: int, kh: int, kw: int, dtype: torch.dtype) -> torch.Tensor:
    """(channels*kh*kw, 1, kh, kw): output channel ``c*kh*kw + i*kw + j`` reads tap (i, j) of channel c.

    That is im2col's row order (channel-major, then kernel row, then kernel column).
    """
    taps = torch.eye(kh * kw, dtype=dtype).reshape(kh * kw, 1, kh, kw)
    return taps.repeat(channels, 1, 1, 1)


def flipped_one_hot_kernel(channels: int, kh: int, kw: int, dtype: torch.dtype) -> torch.Tensor:
    """(channels, kh*kw, kh, kw): input channel ``i*kw + j`` of each group sums into tap (kh-1-i, kw-1-j).

    A stride-1 convolution with it scatters im2col rows back to their pixels (col2im at stride 1).
    """
    taps = torch.eye(kh * kw, dtype=dtype).reshape(kh * kw, kh, kw).flip(1, 2)
    return taps.unsqueeze(0).repeat(channels, 1, 1, 1)


def _pair(v: Sequence[int] | int) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _is_patchify(kernel: tuple[int, int], dilation: tuple[int, int], padding: tuple[int, int],
                 stride: tuple[int, int], height: int, width: int) -> bool:
    """Square, non-overlapping, unpadded patches tiling the image exactly: a pixel (un)shuffle."""
    k = kernel[0]
    return (kernel == (k, k) and stride == kernel and dilation == (1, 1) and padding == (0, 0)
            and height % k == 0 and width % k == 0)


@register_pass
class UnfoldFoldStatic(GraphPass):
    """``F.unfold`` / ``F.fold`` (``aten.im2col`` / ``aten.col2im``) → pixel (un)shuffle or one-hot convs.

    Why: no mobile backend has im2col/col2im. Measured with the pinned
    converters: litert-torch converts ``F.fold`` to ``STABLEHLO_SCATTER``, which the LiteRT
    interpreter then refuses at ``allocate_tensors`` ("Only update, Add, Multiply, Maximum and
    Minimum operations are currently supported for stablehlo.scatter"), and ``F.unfold`` to
    ``GATHER_ND`` through rank-6 tensors; the ONNX exporter gives ``Col2Im`` (in neither the NNAPI
    nor the Core ML EP op list) for fold and ``Gather`` + rank-6 Reshape/Transpose for unfold;
    coremltools rejects overlapping folds ("Only supports stride >= kernel_size for col2im (fold)").
    Rewrite (Apple's ``unfolding_coreml`` / ``folding_coreml``): square patches with stride ==
    kernel, no padding/dilation, tiling the image → ``pixel_unshuffle`` + reshape (unfold) and
    reshape + ``pixel_shuffle`` (fold); the channel orders agree. Otherwise unfold → depthwise
    ``conv2d`` with a constant one-hot (C*kh*kw, 1, kh, kw) kernel, groups=C, same
    stride/padding/dilation; fold → ``conv_transpose2d`` with that kernel, groups=C (it sums
    overlaps as col2im does), or at stride 1 a grouped ``conv2d`` with the flipped kernel.
    Exact: the shuffles move data; the convolutions multiply by 1 and add zeros (finite inputs:
    an inf would meet a 0 weight), and overlapping folds sum the same terms as col2im, possibly in
    another order (float re-association).
    """

    name = "unfold_fold_static"
    fixes = ("Col2Im", "im2col", "col2im", "aten.im2col", "aten.col2im", "STABLEHLO_SCATTER")

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        # Batched or unbatched: (B, C, H, W) / (C, H, W) images, (B, C*kh*kw, L) / (C*kh*kw, L) rows.
        # Float data only: the one-hot convolutions need it.
        if is_op(node, aten.im2col):
            return ctx.rank(node.args[0]) in (3, 4) and ctx.val(node.args[0]).dtype.is_floating_point
        if is_op(node, aten.col2im):
            return ctx.rank(node.args[0]) in (2, 3) and ctx.val(node.args[0]).dtype.is_floating_point
        return False

    def rewrite(self, ctx: PassContext, node: fx.Node) -> bool | None:
        if is_op(node, aten.im2col):
            return self._unfold(ctx, node)
        return self._fold(ctx, node)

    @staticmethod
    def _unfold(ctx: PassContext, node: fx.Node) -> bool | None:
        x, kernel, dilation, padding, stride = node.args[0], *(_pair(a) for a in node.args[1:5])
        channels, height, width = ctx.shape(x)[-3:]
        if ctx.rank(x) == 3:
            x = ctx.call(aten.unsqueeze.default, x, 0)
        if _is_patchify(kernel, dilation, padding, stride, height, width):
            patches = ctx.call(aten.pixel_unshuffle.default, x, kernel[0])
        else:
            weight = ctx.add_constant(one_hot_kernel(channels, *kernel, ctx.val(x).dtype), "unfold_kernel")
            patches = ctx.call(aten.conv2d.default, x, weight, None, list(stride), list(padding),
                               list(dilation), channels)
        ctx.replace(node, ctx.call(aten.reshape.default, patches, list(ctx.shape(node))))

    @staticmethod
    def _fold(ctx: PassContext, node: fx.Node) -> bool | None:
        cols, output_size = node.args[0], _pair(node.args[1])
        kernel, dilation, padding, stride = (_pair(a) for a in node.args[2:6])
        rows, length = ctx.shape(cols)[-2:]
        batch = ctx.shape(cols)[0] if ctx.rank(cols) == 3 else 1
        taps = kernel[0] * kernel[1]
        # The patch grid im2col would have produced for this output size.
        grid = [(output_size[d] + 2 * padding[d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1
                for d in range(2)]
        if rows % taps or grid[0] * grid[1] != length or min(grid) < 1:
            return False
        blocks = ctx.call(aten.reshape.default, cols, [batch, rows, *grid])
        if _is_patchify(kernel, dilation, padding, stride, *output_size):
            image = ctx.call(aten.pixel_shuffle.default, blocks, kernel[0])
        else:
            image = _scatter_patches(ctx, blocks, rows // taps, output_size, kernel, dilation, padding, stride)
        if ctx.rank(cols) == 2:
            image = ctx.call(aten.squeeze.dim, image, 0)
        ctx.replace(node, image)


def _scatter_patches(ctx: PassContext, blocks: fx.Node, channels: int, output_size: tuple[int, int],
                     kernel: tuple[int, int], dilation: tuple[int, int], padding: tuple[int, int],
                     stride: tuple[int, int]) -> fx.Node:
    """col2im of (B, C*kh*kw, gh, gw) patch rows as a one-hot (transposed) depthwise convolution."""
    dtype = ctx.val(blocks).dtype
    grid = ctx.shape(blocks)[2:]
    # A transposed conv covers (grid-1)*s - 2p + d*(k-1) + 1 pixels (never more than the output);
    # col2im leaves the rest zero.
    covered = [(grid[d] - 1) * stride[d] - 2 * padding[d] + dilation[d] * (kernel[d] - 1) + 1 for d in range(2)]
    exact_cover = covered == list(output_size)
    conv_pad = [dilation[d] * (kernel[d] - 1) - padding[d] for d in range(2)]
    if stride == (1, 1) and exact_cover and min(conv_pad) >= 0:
        # Stride 1: a plain grouped conv with the flipped kernel (NNAPI has no ConvTranspose).
        weight = ctx.add_constant(flipped_one_hot_kernel(channels, *kernel, dtype), "fold_kernel")
        return ctx.call(aten.conv2d.default, blocks, weight, None, [1, 1], conv_pad, list(dilation), channels)
    weight = ctx.add_constant(one_hot_kernel(channels, *kernel, dtype), "fold_kernel")
    if exact_cover:
        return ctx.call(aten.conv_transpose2d.input, blocks, weight, None, list(stride), list(padding), [0, 0],
                        channels, list(dilation))
    # Output past the transposed conv's padded output: coremltools 9 fails on output_padding
    # ("'NoneType' object is not iterable"), so take the unpadded output and cut the window col2im
    # writes, [p, p + size), padding with zeros where no patch reaches.
    image = ctx.call(aten.conv_transpose2d.input, blocks, weight, None, list(stride), [0, 0], [0, 0],
                     channels, list(dilation))
    for d in range(2):
        image = _window(ctx, image, 2 + d, padding[d], output_size[d])
    return image


def _window(ctx: PassContext, x: fx.Node, dim: int, start: int, length: int) -> fx.Node:
    """``x[start : start + length]`` along ``dim``, zero-padded at the end where ``x`` is too short."""
    size = ctx.shape(x)[dim]
    end = min(size, start + length)
    if start > 0 or end < size:
        x = ctx.call(aten.slice.Tensor, x, dim, start, end)
    missing = start + length - max(end, start)
    if missing > 0:
        pad = [0, 0] * (ctx.rank(x) - 1 - dim) + [0, missing]
        x = ctx.call(aten.constant_pad_nd.default, x, pad, 0.0)
    return x


# --- pixel_unshuffle without rank-6 intermediates --------------------------------------------------


@register_pass
class PixelUnshuffleRank4(GraphPass):
    """``pixel_unshuffle(x, r)`` → reshape/permute chain whose tensors are all rank ≤ 4.

    Why: the ONNX exporter lowers ``pixel_unshuffle`` through a rank-6 Reshape/Transpose (there is no
    channel-major SpaceToDepth), which the ORT mobile checker rejects for the Core ML EP (rank > 5
    Reshape/Transpose, so the op leaves the EP); NNAPI and the TFLite GPU delegate cap tensors at
    rank 4.
    The chain (B*C*H/r, r, W/r, r) → permute(0,1,3,2) → (B*C, H/r, r*r, W/r) → permute(0,2,1,3) →
    (B, C*r*r, H/r, W/r) moves the same elements. ``pixel_shuffle`` needs no pass: ONNX exports it as
    ``DepthToSpace`` and litert-torch lowers it at rank 4. Exact (pure data movement). Not where an
    in-place op writes the input or the result (at r = 1 the chain is a view, pixel_unshuffle a copy).
    """

    name = "pixel_unshuffle_rank4"
    fixes = ("rank>4", "rank>5")

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        shape = ctx.shape(node.args[0]) if is_op(node, aten.pixel_unshuffle) else None
        if shape is None or len(shape) < 3:
            return False
        # pixel_unshuffle copies; the chain may be a view (r = 1): not where an in-place op would notice
        writes = Aliasing.of(ctx)
        return not (writes.written(node) or writes.written(node.args[0]))

    def rewrite(self, ctx: PassContext, node: fx.Node) -> bool | None:
        x, r = node.args[0], int(node.args[1])
        *lead, channels, height, width = ctx.shape(x)
        planes = math.prod(lead) * channels
        h, w = height // r, width // r
        y = ctx.call(aten.reshape.default, x, [planes * h, r, w, r])
        y = ctx.call(aten.permute.default, y, [0, 1, 3, 2])  # (P*h, i, j, w)
        y = ctx.call(aten.reshape.default, y, [planes, h, r * r, w])
        y = ctx.call(aten.permute.default, y, [0, 2, 1, 3])  # (P, i*r+j, h, w)
        ctx.replace(node, ctx.call(aten.reshape.default, y, list(ctx.shape(node))))
