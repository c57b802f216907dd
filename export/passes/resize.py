"""Resizes: nearest down-sampling by an integer factor, a strided read of the input."""

from __future__ import annotations

import torch
from torch import fx

from edgevit.export.passes import register_pass
from edgevit.export.passes.base import GraphPass, PassContext, aten, is_op
from edgevit.export.passes.pooling import _NEAREST_OPS, _spatial, source_index

_ONE_D = (aten.upsample_nearest1d, aten._upsample_nearest_exact1d)


def _strides(ctx: PassContext, node: fx.Node) -> list[tuple[int, int]] | None:
    """Per spatial axis (offset, step) with ``out[i] = in[offset + i * step]``, step an integer >= 1
    and at least one axis shrinking; else None.

    Like ``upsample_static``, the source index of every output position is measured by running the
    node's own op on an index ramp, so ``nearest`` vs ``nearest-exact``, scale vs size arguments and
    float scale rounding are exactly what PyTorch does.
    """
    dims = 1 if is_op(node, *_ONE_D) else 2
    sizes = _spatial(ctx, node, dims)
    if sizes is None:
        return None
    sizes_in, sizes_out = sizes
    found = []
    for axis, (n, o) in enumerate(zip(sizes_in, sizes_out)):
        line = source_index(node, axis, sizes_in, sizes_out) if n % o == 0 else None
        if line is None:
            return None
        step, offset = n // o, int(line[0])
        if not torch.equal(line, offset + step * torch.arange(o, dtype=torch.float32)):
            return None
        found.append((offset, step))
    return found if any(step > 1 for _, step in found) else None


@register_pass
class NearestDownsampleSlice(GraphPass):
    """Nearest down-sampling by an integer factor (``interpolate(scale_factor=0.5, mode="nearest")``)
    → a strided slice per axis.

    Why: litert-torch lowers it to ``RESIZE_NEAREST_NEIGHBOR``, which picks other pixels than PyTorch
    when shrinking (PyTorch reads source index ``floor(i * 2)``, i.e. pixels 0, 2, 4...; the LiteRT
    artifact reads others): a user model with ``F.interpolate(x, scale_factor=0.5, mode="nearest")``
    failed parity on TFLite even without passes (max error ~4 % of the peak on a random input). A strided
    ``SLICE`` reads exactly the pixels PyTorch reads, on every backend.

    Before::  y = upsample_nearest2d(x, None, [0.5, 0.5])
    After::   y = slice(slice(x, 2, 0, H, 2), 3, 0, W, 2)

    Exact (pure data movement, ``torch.equal``).
    """

    name = "nearest_downsample_slice"
    fixes = ("RESIZE_NEAREST_NEIGHBOR",)

    def matches(self, ctx: PassContext, node: fx.Node) -> bool:
        return is_op(node, *_NEAREST_OPS) and _strides(ctx, node) is not None

    def rewrite(self, ctx: PassContext, node: fx.Node) -> None:
        out = node.args[0]
        strides = _strides(ctx, node)
        rank = len(ctx.shape(out))
        for axis, (offset, step) in zip(range(rank - len(strides), rank), strides):
            if step > 1:
                out = ctx.call(aten.slice.Tensor, out, axis, offset, ctx.shape(out)[axis], step)
        ctx.replace(node, out)
