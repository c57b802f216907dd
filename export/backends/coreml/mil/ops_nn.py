"""Linear algebra, convolution, pooling, normalisation, softmax and activation ops (coremltools
``linear``, ``conv``, ``pool``, ``normalization``, ``activation`` definitions)."""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from edgevit.export.backends.coreml.mil.ops_math import erf
from edgevit.export.backends.coreml.mil.registry import mil_op

# --- linear algebra ---------------------------------------------------------------------------------


@mil_op("linear")
def linear(x, weight, bias=None):
    """``x @ weight.T + bias``; weight is (D_out, D_in)."""
    out = np.matmul(x, np.asarray(weight).T)
    return out if bias is None else out + bias


@mil_op("matmul")
def matmul(x, y, transpose_x=False, transpose_y=False):
    """numpy matmul semantics (rank-1 operands, broadcast batch dims) after optional transposes."""
    x, y = np.asarray(x), np.asarray(y)
    if transpose_x and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if transpose_y and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@mil_op("einsum")
def einsum(values, equation):
    return np.einsum(str(equation), *values, optimize=True)


# --- padding shared by conv and pooling ---------------------------------------------------------------


def spatial_padding(in_sizes, kernel, strides, dilations, pad_type, pad) -> list[tuple[int, int]]:
    """(before, after) per spatial dim for MIL's ``valid`` / ``same`` / ``same_lower`` / ``custom``."""
    if pad_type == "valid":
        return [(0, 0)] * len(in_sizes)
    if pad_type == "custom":
        pad = [int(p) for p in np.atleast_1d(pad)]
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(len(in_sizes))]
    if pad_type not in ("same", "same_lower"):
        raise ValueError(f"unknown pad_type '{pad_type}'")
    out = []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        out.append((small, large) if pad_type == "same" else (large, small))
    return out


def _windows(x: np.ndarray, kernel, strides, dilations) -> np.ndarray:
    """View (N, C, *out, *kernel) of the padded input's sliding windows (no copy)."""
    spatial = tuple(range(2, x.ndim))
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    view = sliding_window_view(x, span, axis=spatial)
    index = [slice(None), slice(None)]
    index += [slice(None, None, s) for s in strides]
    index += [slice(None, None, d) for d in dilations]
    return view[tuple(index)]


# --- convolution ------------------------------------------------------------------------------------


@mil_op("conv")
def conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    """N-d grouped, dilated convolution; weight (C_out, C_in / groups, *K). Direct (im2col + GEMM)."""
    x, weight = np.asarray(x), np.asarray(weight)
    n_sp = x.ndim - 2
    kernel = weight.shape[2:]
    strides = [int(s) for s in (np.atleast_1d(strides) if strides is not None else [1] * n_sp)]
    dilations = [int(d) for d in (np.atleast_1d(dilations) if dilations is not None else [1] * n_sp)]
    pads = spatial_padding(x.shape[2:], kernel, strides, dilations, pad_type, pad)
    x = np.pad(x, [(0, 0), (0, 0), *pads])
    groups = int(groups)
    c_out, c_in_g = weight.shape[:2]
    if groups == x.shape[1] and c_in_g == 1 and c_out == groups:
        out = _depthwise(x, weight, strides, dilations)
    else:
        win = _windows(x, kernel, strides, dilations)  # (N, C, *out, *K)
        k_axes = list(range(2 + n_sp, 2 + 2 * n_sp))
        outs = []
        for g in range(groups):
            xg = win[:, g * c_in_g:(g + 1) * c_in_g]
            wg = weight[g * (c_out // groups):(g + 1) * (c_out // groups)]
            # contract C_in/groups and the kernel axes: (N, *out, C_out/groups)
            outs.append(np.tensordot(xg, wg, axes=([1, *k_axes], [1, *range(2, 2 + n_sp)])))
        out = np.moveaxis(np.concatenate(outs, axis=-1), -1, 1)
    if bias is not None:
        out = out + np.asarray(bias).reshape((1, -1) + (1,) * n_sp)
    return np.ascontiguousarray(out)


def _depthwise(x: np.ndarray, weight: np.ndarray, strides, dilations) -> np.ndarray:
    """One channel per group: a sum of shifted, strided slices times per-channel taps."""
    n_sp = x.ndim - 2
    kernel = weight.shape[2:]
    out_sizes = [(size - (k - 1) * d - 1) // s + 1 for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations)]
    out = np.zeros(x.shape[:2] + tuple(out_sizes), dtype=np.result_type(x, weight))
    for tap in np.ndindex(*kernel):
        index = [slice(None), slice(None)]
        index += [slice(t * d, t * d + s * (o - 1) + 1, s) for t, d, s, o in zip(tap, dilations, strides, out_sizes)]
        out += x[tuple(index)] * weight[(slice(None), 0, *tap)].reshape((1, -1) + (1,) * n_sp)
    return out


@mil_op("conv_transpose")
def conv_transpose(x, weight, bias=None, pad=None, output_shape=None, pad_type="valid", strides=None,
                   dilations=None, groups=1):
    """Transposed convolution; weight (C_in, C_out / groups, *K): scatter-add of every input tap."""
    x, weight = np.asarray(x), np.asarray(weight)
    n_sp = x.ndim - 2
    kernel = weight.shape[2:]
    strides = [int(s) for s in (np.atleast_1d(strides) if strides is not None else [1] * n_sp)]
    dilations = [int(d) for d in (np.atleast_1d(dilations) if dilations is not None else [1] * n_sp)]
    groups = int(groups)
    c_in, c_out_g = weight.shape[:2]
    full = [(i - 1) * s + (k - 1) * d + 1 for i, s, k, d in zip(x.shape[2:], strides, kernel, dilations)]
    out = np.zeros((x.shape[0], c_out_g * groups, *full), dtype=np.result_type(x, weight))
    c_in_g = c_in // groups
    for g in range(groups):
        xg = x[:, g * c_in_g:(g + 1) * c_in_g]
        for tap in np.ndindex(*kernel):
            contrib = np.tensordot(xg, weight[(slice(g * c_in_g, (g + 1) * c_in_g), slice(None), *tap)], axes=([1], [0]))
            contrib = np.moveaxis(contrib, -1, 1)
            index = [slice(None), slice(g * c_out_g, (g + 1) * c_out_g)]
            index += [slice(t * d, t * d + s * (i - 1) + 1, s) for t, d, s, i in zip(tap, dilations, strides, x.shape[2:])]
            out[tuple(index)] += contrib
    if pad_type == "custom" and pad is not None:
        p = [int(v) for v in np.atleast_1d(pad)]
        crop = [slice(p[2 * i], full[i] - p[2 * i + 1]) for i in range(n_sp)]
        out = out[(slice(None), slice(None), *crop)]
    elif pad_type in ("same", "same_lower"):
        target = [i * s for i, s in zip(x.shape[2:], strides)]
        crop = []
        for size, want in zip(full, target):
            total = size - want
            before = total // 2 if pad_type == "same" else total - total // 2
            crop.append(slice(before, before + want))
        out = out[(slice(None), slice(None), *crop)]
    if output_shape is not None:
        shape = [int(v) for v in np.atleast_1d(output_shape)][-n_sp:]
        out = out[(slice(None), slice(None), *[slice(0, s) for s in shape])]
    if bias is not None:
        out = out + np.asarray(bias).reshape((1, -1) + (1,) * n_sp)
    return out


# --- pooling ----------------------------------------------------------------------------------------


def _pool_pads(x, kernel, strides, pad_type, pad, ceil_mode):
    pads = spatial_padding(x.shape[2:], kernel, strides, [1] * len(kernel), pad_type, pad)
    if not ceil_mode:
        return pads
    out = []
    for size, k, s, (b, e) in zip(x.shape[2:], kernel, strides, pads):
        n_out = math.ceil((size + b + e - k) / s) + 1
        if (n_out - 1) * s >= size + b and b + e > 0:  # the last window may not start in the padding
            n_out -= 1
        out.append((b, max(e, (n_out - 1) * s + k - size - b)))
    return out


def _pool(x, kernel_sizes, strides, pad_type, pad, ceil_mode, pad_value):
    """Windows of the padded input, plus two masks over the padded grid for the average's divisor:
    the input itself, and the input with its declared padding (not the ceil-mode overhang)."""
    x = np.asarray(x)
    kernel = [int(k) for k in np.atleast_1d(kernel_sizes)]
    strides = [int(s) for s in (np.atleast_1d(strides) if strides is not None else [1] * len(kernel))]
    declared = _pool_pads(x, kernel, strides, pad_type, pad, False)
    pads = _pool_pads(x, kernel, strides, pad_type, pad, bool(ceil_mode))
    padded = np.pad(x, [(0, 0), (0, 0), *pads], constant_values=pad_value)
    inside = np.pad(np.ones(x.shape[2:], dtype=np.float32), pads)
    with_pad = np.pad(np.ones([s + b + e for s, (b, e) in zip(x.shape[2:], declared)], dtype=np.float32),
                      [(0, e - d) for (_, e), (_, d) in zip(pads, declared)])
    return _windows(padded, kernel, strides, [1] * len(kernel)), kernel, strides, (inside, with_pad)


@mil_op("max_pool")
def max_pool(x, kernel_sizes, strides=None, pad_type="valid", pad=None, ceil_mode=False):
    win, kernel, _, _ = _pool(x, kernel_sizes, strides, pad_type, pad, ceil_mode, -np.inf)
    return win.max(axis=tuple(range(-len(kernel), 0)))


@mil_op("avg_pool")
def avg_pool(x, kernel_sizes, strides=None, pad_type="valid", pad=None, ceil_mode=False,
             exclude_padding_from_average=False):
    """The divisor counts the input (and, unless excluded, the declared padding); never the ceil-mode
    overhang past the padding (PyTorch's rule, which coremltools' torch frontend converts from)."""
    win, kernel, strides, (inside, with_pad) = _pool(x, kernel_sizes, strides, pad_type, pad, ceil_mode, 0.0)
    axes = tuple(range(-len(kernel), 0))
    total = win.sum(axis=axes)
    mask = inside if exclude_padding_from_average else with_pad
    count = _windows(mask[None, None], kernel, strides, [1] * len(kernel)).sum(axis=axes)
    return (total / count).astype(np.asarray(x).dtype)


@mil_op("l2_pool")
def l2_pool(x, kernel_sizes, strides=None, pad_type="valid", pad=None):
    win, kernel, _, _ = _pool(np.square(x), kernel_sizes, strides, pad_type, pad, False, 0.0)
    return np.sqrt(win.sum(axis=tuple(range(-len(kernel), 0))))


# --- normalisation ----------------------------------------------------------------------------------


def _channel_shape(x: np.ndarray) -> tuple[int, ...]:
    return (1, -1) + (1,) * (x.ndim - 2)


def _affine(out: np.ndarray, gamma, beta, shape) -> np.ndarray:
    """``out * gamma + beta`` with either left out, the parameters reshaped to ``shape``."""
    if gamma is not None:
        out = out * np.reshape(gamma, shape)
    if beta is not None:
        out = out + np.reshape(beta, shape)
    return out


def _standardise(x: np.ndarray, axes: tuple[int, ...], epsilon) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) over ``axes``, the biased variance (as every MIL norm uses)."""
    mean = x.mean(axis=axes, keepdims=True)
    var = np.square(x - mean).mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + np.float32(epsilon))


@mil_op("batch_norm")
def batch_norm(x, mean, variance, gamma=None, beta=None, epsilon=1e-5):
    x = np.asarray(x)
    shape = _channel_shape(x)
    out = (x - np.reshape(mean, shape)) / np.sqrt(np.reshape(variance, shape) + np.float32(epsilon))
    return _affine(out, gamma, beta, shape)


@mil_op("instance_norm")
def instance_norm(x, gamma=None, beta=None, epsilon=1e-5):
    """Normalise every (sample, channel) over its spatial dims; gamma/beta per channel."""
    x = np.asarray(x)
    return _affine(_standardise(x, tuple(range(2, x.ndim)), epsilon), gamma, beta, _channel_shape(x))


@mil_op("layer_norm")
def layer_norm(x, axes=None, gamma=None, beta=None, epsilon=1e-5):
    """Normalise over ``axes`` (default: all); gamma/beta have the shape of the normalised dims, placed
    on those axes in order (1 elsewhere)."""
    x = np.asarray(x)
    axes = tuple(range(x.ndim)) if axes is None else tuple(int(a) % x.ndim for a in np.atleast_1d(axes))
    shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    return _affine(_standardise(x, axes, epsilon), gamma, beta, shape)


@mil_op("l2_norm")
def l2_norm(x, epsilon=1e-6):
    """Divide by sqrt(sum of squares + eps) over the last three dims (all but the batch dims; MIL)."""
    x = np.asarray(x)
    axes = tuple(range(max(x.ndim - 3, 1), x.ndim)) if x.ndim > 1 else (0,)
    return x / np.sqrt(np.sum(x * x, axis=axes, keepdims=True) + np.float32(epsilon))


# --- softmax and activations ------------------------------------------------------------------------


@mil_op("softmax")
def softmax(x, axis=-1):
    x = np.asarray(x)
    shifted = x - np.max(x, axis=int(axis), keepdims=True)
    e = np.exp(shifted)
    return e / np.sum(e, axis=int(axis), keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # two branches so exp never overflows: exp(-|x|) <= 1
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.asarray(x).dtype)


@mil_op("gelu")
def gelu(x, mode="EXACT"):
    x = np.asarray(x)
    if mode == "EXACT":
        return 0.5 * x * (1.0 + erf(x / np.float32(math.sqrt(2.0))))
    if mode == "TANH_APPROXIMATION":
        inner = np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x * x * x)
        return 0.5 * x * (1.0 + np.tanh(inner))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(np.float32(1.702) * x)
    raise ValueError(f"unknown gelu mode '{mode}'")


@mil_op("relu")
def relu(x):
    return np.maximum(x, 0).astype(np.asarray(x).dtype)


@mil_op("relu6")
def relu6(x):
    return np.clip(x, 0, 6).astype(np.asarray(x).dtype)


@mil_op("leaky_relu")
def leaky_relu(x, alpha=0.01):
    return np.where(x >= 0, x, np.float32(alpha) * x)


@mil_op("elu")
def elu(x, alpha=1.0):
    return np.where(x > 0, x, np.float32(alpha) * np.expm1(np.minimum(x, 0)))


@mil_op("sigmoid")
def sigmoid(x):
    return _sigmoid(np.asarray(x))


@mil_op("silu")
def silu(x):
    return np.asarray(x) * _sigmoid(np.asarray(x))


@mil_op("sigmoid_hard")
def sigmoid_hard(x, alpha=0.2, beta=0.5):
    return np.minimum(np.maximum(np.float32(alpha) * x + np.float32(beta), 0), 1).astype(np.asarray(x).dtype)


@mil_op("softplus")
def softplus(x):
    x = np.asarray(x)
    return np.logaddexp(0, x).astype(x.dtype)


@mil_op("softsign")
def softsign(x):
    return x / (1 + np.abs(x))


@mil_op("prelu")
def prelu(x, alpha):
    x = np.asarray(x)
    return np.where(x >= 0, x, np.reshape(alpha, _channel_shape(x)) * x)


@mil_op("scaled_tanh")
def scaled_tanh(x, alpha=1.0, beta=1.0):
    return np.float32(alpha) * np.tanh(np.float32(beta) * x)


@mil_op("linear_activation")
def linear_activation(x, alpha, beta=0.0):
    return np.float32(alpha) * x + np.float32(beta)


@mil_op("thresholded_relu")
def thresholded_relu(x, alpha=1.0):
    return np.where(x > alpha, x, 0).astype(np.asarray(x).dtype)


@mil_op("clamped_relu")
def clamped_relu(x, alpha, beta):
    return np.minimum(np.where(x >= 0, x, np.float32(alpha) * x), np.float32(beta))


@mil_op("scaled_dot_product_attention")
def scaled_dot_product_attention(query, key, value, attn_mask=None):
    """iOS18 SDPA: softmax(q k^T / sqrt(d) + mask) v; a boolean mask keeps True positions."""
    scores = np.matmul(query, np.swapaxes(key, -1, -2)) / np.float32(math.sqrt(np.asarray(query).shape[-1]))
    if attn_mask is not None:
        mask = np.asarray(attn_mask)
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + mask
    return np.matmul(softmax(scores, -1), value)
