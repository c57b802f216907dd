"""Shape, indexing, gather/scatter, selection and resampling ops (coremltools
``tensor_transformation``, ``tensor_operation``, ``scatter_gather``, ``image_resizing`` definitions)."""

from __future__ import annotations

import numpy as np

from edgevit.export.backends.coreml.mil.registry import mil_op


def _ints(v) -> list[int]:
    return [int(i) for i in np.atleast_1d(v)]


# --- shape ------------------------------------------------------------------------------------------


@mil_op("reshape")
def reshape(x, shape):
    """iOS17 rules: a 0 copies the input dim matched from the right (1 when out of range); -1 is inferred."""
    x = np.asarray(x)
    shape = _ints(shape)
    out = []
    for i, s in enumerate(shape):
        if s == 0:
            j = x.ndim - (len(shape) - i)
            s = x.shape[j] if 0 <= j < x.ndim else 1
        out.append(s)
    return x.reshape(out)


@mil_op("transpose")
def transpose(x, perm):
    return np.transpose(x, _ints(perm))


@mil_op("expand_dims")
def expand_dims(x, axes):
    x = np.asarray(x)
    rank = x.ndim + len(_ints(axes))
    for a in sorted(a % rank for a in _ints(axes)):
        x = np.expand_dims(x, a)
    return x


@mil_op("squeeze")
def squeeze(x, axes=None):
    x = np.asarray(x)
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(a % x.ndim for a in _ints(axes)))


@mil_op("flatten2d")
def flatten2d(x, axis=1):
    x = np.asarray(x)
    axis = int(axis) % x.ndim if x.ndim else 0
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


@mil_op("shape")
def shape(x):
    return np.asarray(np.shape(x), dtype=np.int32)


@mil_op("fill")
def fill(shape, value=0.0):
    return np.full(_ints(shape), value, dtype=np.asarray(value).dtype if np.ndim(value) == 0 else np.float32)


@mil_op("range_1d")
def range_1d(end, start, step):
    dtype = np.result_type(np.asarray(start), np.asarray(end), np.asarray(step))
    return np.arange(start, end, step, dtype=dtype)


@mil_op("tile")
def tile(x, reps):
    return np.tile(x, _ints(reps))


@mil_op("reverse")
def reverse(x, axes=None):
    x = np.asarray(x)
    return np.flip(x, axis=None if axes is None else tuple(_ints(axes)))


@mil_op("concat")
def concat(values, axis, interleave=False):
    arrays = [np.asarray(v) for v in values]
    axis = int(axis)
    if not interleave:
        return np.concatenate(arrays, axis=axis)
    # out[i::n] = values[i] along axis: stack on a new axis right after ``axis``, then merge the two
    axis %= arrays[0].ndim
    stacked = np.stack(arrays, axis=axis + 1)
    shape = list(arrays[0].shape)
    shape[axis] *= len(arrays)
    return stacked.reshape(shape)


@mil_op("stack")
def stack(values, axis):
    return np.stack([np.asarray(v) for v in values], axis=int(axis))


@mil_op("split")
def split(x, axis, num_splits=None, split_sizes=None):
    x = np.asarray(x)
    axis = int(axis)
    if split_sizes is not None:
        bounds = np.cumsum(_ints(split_sizes))[:-1]
        return tuple(np.split(x, bounds, axis=axis))
    return tuple(np.split(x, int(num_splits), axis=axis))


@mil_op("slice_by_index")
def slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    x = np.asarray(x)
    n = x.ndim
    begin, end = _ints(begin), _ints(end)
    stride = _ints(stride) if stride is not None else [1] * n
    begin_mask = [bool(b) for b in np.atleast_1d(begin_mask)] if begin_mask is not None else [False] * n
    end_mask = [bool(b) for b in np.atleast_1d(end_mask)] if end_mask is not None else [False] * n
    squeeze_mask = [bool(b) for b in np.atleast_1d(squeeze_mask)] if squeeze_mask is not None else [False] * n
    index: list = []
    for i in range(n):
        if squeeze_mask[i]:
            index.append(begin[i])
            continue
        b = None if begin_mask[i] else begin[i]
        e = None if end_mask[i] else end[i]
        index.append(slice(b, e, stride[i]))
    return x[tuple(index)]


@mil_op("slice_by_size")
def slice_by_size(x, begin, size):
    x = np.asarray(x)
    index = []
    for b, s, dim in zip(_ints(begin), _ints(size), x.shape):
        b = b + dim if b < 0 else b
        index.append(slice(b, dim if s == -1 else b + s))
    return x[tuple(index)]


@mil_op("pad")
def pad(x, pad, mode="constant", constant_val=0.0):
    """``pad`` covers the last len(pad)/2 dims, (before, after) each."""
    x = np.asarray(x)
    p = _ints(pad)
    n = len(p) // 2
    widths = [(0, 0)] * (x.ndim - n) + [(p[2 * i], p[2 * i + 1]) for i in range(n)]
    if mode == "constant":
        return np.pad(x, widths, constant_values=constant_val)
    if mode == "reflect":
        return np.pad(x, widths, mode="reflect")
    if mode == "replicate":
        return np.pad(x, widths, mode="edge")
    raise ValueError(f"unknown pad mode '{mode}'")


@mil_op("band_part")
def band_part(x, lower=-1, upper=-1):
    x = np.asarray(x)
    rows, cols = x.shape[-2:]
    i, j = np.arange(rows)[:, None], np.arange(cols)[None, :]
    keep = ((lower < 0) | (i - j <= lower)) & ((upper < 0) | (j - i <= upper))
    return np.where(keep, x, 0).astype(x.dtype)


@mil_op("cumsum")
def cumsum(x, axis=0, exclusive=False, reverse=False):
    x = np.asarray(x)
    axis = int(axis)
    y = np.flip(x, axis) if reverse else x
    out = np.cumsum(y, axis=axis, dtype=x.dtype)
    if exclusive:
        out = out - y
    return np.flip(out, axis) if reverse else out


# --- gather / scatter -------------------------------------------------------------------------------


@mil_op("gather")
def gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    """K = D[:axis] + N[batch_dims:] + D[axis+1:]; indices in [-D[axis], D[axis])."""
    x, indices = np.asarray(x), np.asarray(indices).astype(np.int64)
    axis, batch_dims = int(axis) % x.ndim, int(batch_dims)
    if batch_dims == 0:
        return np.take(x, indices, axis=axis)
    batch = x.shape[:batch_dims]
    xs = x.reshape((-1,) + x.shape[batch_dims:])
    ids = indices.reshape((-1,) + indices.shape[batch_dims:])
    out = np.stack([np.take(xb, ib, axis=axis - batch_dims) for xb, ib in zip(xs, ids)])
    return out.reshape(batch + out.shape[1:])


@mil_op("gather_along_axis")
def gather_along_axis(x, indices, axis=0, validate_indices=False):
    x, indices = np.asarray(x), np.asarray(indices).astype(np.int64)
    axis = int(axis) % x.ndim
    indices = np.where(indices < 0, indices + x.shape[axis], indices)
    return np.take_along_axis(x, indices, axis=axis)


@mil_op("gather_nd")
def gather_nd(x, indices, batch_dims=0, validate_indices=False):
    x, indices = np.asarray(x), np.asarray(indices).astype(np.int64)
    if int(batch_dims):
        batch = x.shape[:int(batch_dims)]
        xs = x.reshape((-1,) + x.shape[int(batch_dims):])
        ids = indices.reshape((-1,) + indices.shape[int(batch_dims):])
        out = np.stack([gather_nd(xb, ib) for xb, ib in zip(xs, ids)])
        return out.reshape(batch + out.shape[1:])
    depth = indices.shape[-1]
    return x[tuple(np.moveaxis(indices, -1, 0))] if depth else np.broadcast_to(x, indices.shape[:-1] + x.shape)


_SCATTER = {"update": None, "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
            "max": np.maximum, "min": np.minimum}


def _scatter_into(out: np.ndarray, index: tuple, updates: np.ndarray, mode: str) -> np.ndarray:
    if mode not in _SCATTER:
        raise ValueError(f"unknown scatter mode '{mode}'")
    if mode == "update":
        out[index] = updates
    else:
        _SCATTER[mode].at(out, index, updates)
    return out


@mil_op("scatter_along_axis")
def scatter_along_axis(data, indices, updates, axis=0, mode="add", validate_indices=False):
    data, indices = np.array(data), np.asarray(indices).astype(np.int64)
    axis = int(axis) % data.ndim
    indices = np.where(indices < 0, indices + data.shape[axis], indices)
    grid = list(np.indices(indices.shape, sparse=True))
    grid[axis] = indices
    return _scatter_into(data, tuple(grid), np.asarray(updates), mode)


@mil_op("scatter")
def scatter(data, indices, updates, axis=0, mode="add", validate_indices=False):
    """Slices of ``updates`` written at ``indices`` (1-D) along ``axis``."""
    data, indices = np.array(data), np.asarray(indices).astype(np.int64)
    axis = int(axis) % data.ndim
    moved = np.moveaxis(data, axis, 0)
    upd = np.moveaxis(np.asarray(updates), axis, 0)
    _scatter_into(moved, (indices,), upd, mode)
    return data


@mil_op("scatter_nd")
def scatter_nd(data, indices, updates, mode="add", validate_indices=False):
    data, indices = np.array(data), np.asarray(indices).astype(np.int64)
    return _scatter_into(data, tuple(np.moveaxis(indices, -1, 0)), np.asarray(updates), mode)


# --- selection --------------------------------------------------------------------------------------


@mil_op("topk")
def topk(x, k=1, axis=-1, ascending=False, sort=True, return_indices=True, output_indices_dtype="int32"):
    """Values and indices of the k largest (smallest when ascending) along ``axis``; ties keep the lower
    index first (a stable sort, as Core ML and torch.topk on CPU do for exact ties)."""
    x = np.asarray(x)
    axis = int(axis) % x.ndim
    k = x.shape[axis] if int(k) == -1 else int(k)
    order = np.argsort(x if ascending else -x, axis=axis, kind="stable") if x.dtype.kind != "b" else \
        np.argsort(x, axis=axis, kind="stable")
    idx = np.take(order, np.arange(k), axis=axis)
    values = np.take_along_axis(x, idx, axis=axis)
    if not return_indices:
        return values
    return values, idx.astype(np.uint16 if output_indices_dtype == "uint16" else np.int32)


@mil_op("argsort")
def argsort(x, axis=-1, ascending=False):
    x = np.asarray(x)
    return np.argsort(x if ascending else -x, axis=int(axis), kind="stable").astype(np.int32)


@mil_op("non_zero")
def non_zero(x):
    return np.argwhere(np.asarray(x)).astype(np.int32)


@mil_op("one_hot")
def one_hot(indices, one_hot_vector_size, axis=-1, on_value=1, off_value=0):
    indices = np.asarray(indices).astype(np.int64)
    eye = np.arange(int(one_hot_vector_size)) == indices[..., None]
    out = np.where(eye, on_value, off_value)
    return np.moveaxis(out, -1, int(axis)) if int(axis) != -1 else out


# --- channel/space rearrangement --------------------------------------------------------------------


def _regroup(x, factor, split, perm, merged) -> np.ndarray:
    """Move ``factor`` x ``factor`` blocks between channels and space: split the (N, C, H, W) dims as
    ``split(n, c, h, w, f)``, permute, merge as ``merged(n, c, h, w, f)``."""
    x = np.asarray(x)
    f = int(factor)
    n, c, h, w = x.shape
    return x.reshape(split(n, c, h, w, f)).transpose(perm).reshape(merged(n, c, h, w, f))


@mil_op("pixel_shuffle")
def pixel_shuffle(x, upscale_factor):
    """(N, C*r*r, H, W) -> (N, C, H*r, W*r), channel-major blocks (PyTorch's order)."""
    return _regroup(x, upscale_factor, lambda n, c, h, w, r: (n, c // (r * r), r, r, h, w), (0, 1, 4, 2, 5, 3),
                    lambda n, c, h, w, r: (n, c // (r * r), h * r, w * r))


@mil_op("pixel_unshuffle")
def pixel_unshuffle(x, downscale_factor):
    return _regroup(x, downscale_factor, lambda n, c, h, w, r: (n, c, h // r, r, w // r, r), (0, 1, 3, 5, 2, 4),
                    lambda n, c, h, w, r: (n, c * r * r, h // r, w // r))


@mil_op("space_to_depth")
def space_to_depth(x, block_size):
    """Like pixel_unshuffle but block-offset-major channels (TensorFlow's order)."""
    return _regroup(x, block_size, lambda n, c, h, w, b: (n, c, h // b, b, w // b, b), (0, 3, 5, 1, 2, 4),
                    lambda n, c, h, w, b: (n, c * b * b, h // b, w // b))


@mil_op("depth_to_space")
def depth_to_space(x, block_size):
    return _regroup(x, block_size, lambda n, c, h, w, b: (n, b, b, c // (b * b), h, w), (0, 3, 4, 1, 5, 2),
                    lambda n, c, h, w, b: (n, c // (b * b), h * b, w * b))


# --- resampling -------------------------------------------------------------------------------------


def _nearest_index(size_in: int, size_out: int, scale: float) -> np.ndarray:
    # Core ML / torch nearest: floor(i / scale), clamped
    return np.minimum(np.floor(np.arange(size_out) / scale).astype(np.int64), size_in - 1)


@mil_op("upsample_nearest_neighbor")
def upsample_nearest_neighbor(x, scale_factor_height=1, scale_factor_width=1):
    x = np.asarray(x)
    h, w = x.shape[-2:]
    sh, sw = float(scale_factor_height), float(scale_factor_width)
    rows = _nearest_index(h, int(np.floor(h * sh)), sh)
    cols = _nearest_index(w, int(np.floor(w * sw)), sw)
    return x[..., rows, :][..., cols]


@mil_op("resize_nearest_neighbor")
def resize_nearest_neighbor(x, target_size_height, target_size_width):
    x = np.asarray(x)
    h, w = x.shape[-2:]
    th, tw = int(target_size_height), int(target_size_width)
    return x[..., _nearest_index(h, th, th / h), :][..., _nearest_index(w, tw, tw / w)]


def _grid(size_in: int, size_out: int, mode: str) -> np.ndarray:
    """Sampling positions in input coordinates (resize_bilinear's Notes, verbatim)."""
    i = np.arange(size_out, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if size_out == 1:
            g = np.array([0.0 if mode == "STRICT_ALIGN_CORNERS" else (size_in - 1) / 2])
        else:
            g = i * (size_in - 1) / (size_out - 1)
    elif mode == "DEFAULT":
        g = i * ((size_in - size_in / size_out) / (size_out - 1)) if size_out > 1 else np.zeros(1)
    elif mode == "OFFSET_CORNERS":
        delta = max(1, size_in - 1) / size_out
        g = 0.5 * delta + i * delta
    elif mode == "UNALIGN_CORNERS":
        spacing = size_in / size_out
        g = i * spacing + 0.5 * spacing - 0.5
    else:
        raise ValueError(f"unknown sampling_mode '{mode}'")
    return np.clip(g, 0, size_in - 1)


def _lerp_axis(x: np.ndarray, grid: np.ndarray, axis: int) -> np.ndarray:
    lo = np.floor(grid).astype(np.int64)
    hi = np.minimum(lo + 1, x.shape[axis] - 1)
    frac = (grid - lo).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = -1
    a, b = np.take(x, lo, axis=axis), np.take(x, hi, axis=axis)
    return a + (b - a) * frac.reshape(shape)


def _bilinear(x: np.ndarray, out_h: int, out_w: int, mode: str) -> np.ndarray:
    x = np.asarray(x)
    y = _lerp_axis(x, _grid(x.shape[-2], out_h, mode), x.ndim - 2)
    return _lerp_axis(y, _grid(x.shape[-1], out_w, mode), x.ndim - 1)


@mil_op("resize_bilinear")
def resize_bilinear(x, target_size_height=1, target_size_width=1, sampling_mode="DEFAULT"):
    return _bilinear(x, int(target_size_height), int(target_size_width), sampling_mode)


@mil_op("upsample_bilinear")
def upsample_bilinear(x, scale_factor_height=1, scale_factor_width=1, align_corners=True, half_pixel_centers=None):
    """align_corners -> STRICT_ALIGN_CORNERS grid; half_pixel_centers (default: not align_corners) ->
    the half-pixel grid of torch ``align_corners=False``; else TF's legacy DEFAULT grid."""
    x = np.asarray(x)
    h, w = x.shape[-2:]
    out_h, out_w = int(np.floor(h * float(scale_factor_height))), int(np.floor(w * float(scale_factor_width)))
    if half_pixel_centers is None:
        half_pixel_centers = not align_corners
    if align_corners:
        return _bilinear(x, out_h, out_w, "STRICT_ALIGN_CORNERS")
    if not half_pixel_centers:
        return _bilinear(x, out_h, out_w, "DEFAULT")
    # half-pixel with the scale given (torch semantics: src = (dst + 0.5) / scale - 0.5)
    def grid(size_in, size_out, scale):
        return np.clip((np.arange(size_out) + 0.5) / scale - 0.5, 0, size_in - 1)

    y = _lerp_axis(x, grid(h, out_h, float(scale_factor_height)), x.ndim - 2)
    return _lerp_axis(y, grid(w, out_w, float(scale_factor_width)), x.ndim - 1)


@mil_op("resize")
def resize(x, shape, resized_dims, interpolation_mode="LINEAR", sampling_mode="DEFAULT"):
    x = np.asarray(x)
    shape = _ints(shape)
    dims = int(resized_dims)
    targets = []
    for k in range(dims):
        s = shape[len(shape) - dims + k]
        targets.append(x.shape[x.ndim - dims + k] if s == 0 else s)
    if dims != 2:
        raise ValueError(f"resize over {dims} dims is not implemented (2 only)")
    if interpolation_mode == "NEAREST_NEIGHBOR":
        return resize_nearest_neighbor(x, *targets)
    return _bilinear(x, targets[0], targets[1], sampling_mode)
