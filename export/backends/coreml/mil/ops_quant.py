"""Quantization ops: compressed-weight ``constexpr_*`` ops and activation ``quantize``/``dequantize``
(coremltools ``iOS16/constexpr_ops.py``, ``iOS18/compression.py``, ``iOS17/quantization_ops.py``).

What ``coremltools.optimize.coreml`` writes into a package: ``linear_quantize_weights`` emits
``constexpr_affine_dequantize`` (iOS16/17 programs) or ``constexpr_blockwise_shift_scale`` (iOS18),
``palettize_weights`` ``constexpr_lut_to_dense``, ``prune_weights`` ``constexpr_sparse_to_dense``, and
``linear_quantize_activations`` ``quantize`` -> ``dequantize`` pairs around the ops it quantizes.

Two ops keep one name across opsets with different inputs; the inputs present say which definition a
program uses (the milproto loader keeps the names of the opset the package was written for):

- ``constexpr_lut_to_dense``: iOS16 has ``shape`` and bit-packed ``indices`` (LSB first), iOS18 has
  unpacked ``indices`` shaped like the output, a per-block ``lut`` and ``vector_axis``;
- ``constexpr_sparse_to_dense``: iOS16 has ``shape`` and a bit-packed ``mask``, iOS18 an unpacked one.

Sub-byte types (int4, uint4, uint1...) arrive unpacked: the loader stores them as one int8/uint8 per
element. Everything dequantizes in float32 (the executor's arithmetic); the result is what Core ML
materialises at load time (constexpr) or computes (quantize/dequantize).
"""

from __future__ import annotations

import numpy as np

from edgevit.export.backends.coreml.mil.registry import mil_op

#: the integer range each quantized dtype clips to (coremltools ``builtin_to_range``)
QUANT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15)}


def _along_axis(param, rank: int, axis) -> np.ndarray:
    """A scalar or per-axis vector (scale, zero point) shaped to broadcast against a rank-``rank`` tensor."""
    param = np.asarray(param)
    if param.ndim == rank:
        return param
    if param.ndim == 0:
        return param.reshape((1,) * rank)
    shape = [1] * rank
    shape[int(axis) % rank] = param.size
    return param.reshape(shape)


def _repeat_blocks(param: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Expand a per-block parameter (same rank as the data, each dim dividing the data's) to ``shape``."""
    for axis, (size, blocks) in enumerate(zip(shape, param.shape)):
        if size % blocks:
            raise ValueError(f"{blocks} blocks do not divide dim {axis} of size {size}")
        if size != blocks:
            param = np.repeat(param, size // blocks, axis=axis)
    return param


def unpack_bits(packed, nbits: int, count: int) -> np.ndarray:
    """``count`` unsigned ``nbits``-bit fields packed LSB first into bytes (the iOS16 constexpr layout)."""
    bits = np.unpackbits(np.asarray(packed).astype(np.uint8), bitorder="little")
    if bits.size < nbits * count:
        raise ValueError(f"{bits.size} bits hold fewer than {count} {nbits}-bit indices")
    fields = bits[: nbits * count].reshape(count, nbits)
    values = np.zeros(count, dtype=np.uint16)
    for bit in range(nbits):  # bit by bit: no (count, nbits) wide-integer temporary for large weights
        values |= fields[:, bit].astype(np.uint16) << bit
    return values


# --- compressed weights (constexpr: materialised once, at model load) ---------------------------------


@mil_op("constexpr_affine_dequantize")
def constexpr_affine_dequantize(quantized_data, zero_point, scale, axis):
    """iOS16: ``scale * (quantized_data - zero_point)``, scale/zero point scalars or vectors along ``axis``."""
    data = np.asarray(quantized_data).astype(np.float32)
    zero = _along_axis(np.asarray(zero_point).astype(np.float32), data.ndim, axis)
    return (data - zero) * _along_axis(np.asarray(scale, dtype=np.float32), data.ndim, axis)


@mil_op("constexpr_blockwise_shift_scale")
def constexpr_blockwise_shift_scale(data, scale, offset=None):
    """iOS18: ``scale * (data - offset)`` with one scale/offset per block; block sizes are the ratios of
    ``data.shape`` to ``scale.shape`` (per-tensor, per-channel and per-block are all this one op)."""
    values = np.asarray(data).astype(np.float32)
    out = values
    if offset is not None:
        out = values - _repeat_blocks(np.asarray(offset).astype(np.float32), values.shape)
    return out * _repeat_blocks(np.asarray(scale, dtype=np.float32), values.shape)


@mil_op("constexpr_lut_to_dense")
def constexpr_lut_to_dense(indices, lut, shape=None, vector_axis=None):
    """Palettized weights: each index picks a value (or a vector) from a look-up table."""
    if shape is not None:  # iOS16: one LUT of 2**nbits values, indices bit-packed LSB first
        lut = np.asarray(lut)
        nbits = int(np.log2(lut.size))
        dims = [int(d) for d in np.atleast_1d(shape)]
        return lut[unpack_bits(indices, nbits, int(np.prod(dims)))].reshape(dims)
    return _lut_to_dense_ios18(np.asarray(indices), np.asarray(lut), vector_axis)


def _lut_to_dense_ios18(indices: np.ndarray, lut: np.ndarray, vector_axis) -> np.ndarray:
    """iOS18: ``lut`` is [blocks per dim..., 2**nbits, vector size]; each element's block picks its table."""
    rank = indices.ndim
    vector = lut.shape[-1]
    # the table of every element: block index along each dim = position // block size (open grids that
    # broadcast in the indexing, so nothing index-sized is built per dim)
    block = tuple((np.arange(size) // (size // lut.shape[d])).reshape([-1 if i == d else 1 for i in range(rank)])
                  for d, size in enumerate(indices.shape))
    picked = lut[block + (indices.astype(np.intp),)]  # indices.shape + (vector,)
    if vector == 1:
        return picked[..., 0]
    # vector palettization: each index expands to `vector` consecutive elements along vector_axis
    axis = int(vector_axis) % rank
    picked = np.moveaxis(picked, -1, axis + 1)  # put the vector right after its axis
    out_shape = list(indices.shape)
    out_shape[axis] *= vector
    return picked.reshape(out_shape)


@mil_op("constexpr_sparse_to_dense")
def constexpr_sparse_to_dense(nonzero_data, mask, shape=None):
    """Pruned weights: the mask's set bits take ``nonzero_data`` in row-major order, the rest are 0."""
    data = np.asarray(nonzero_data)
    if shape is not None:  # iOS16: mask bit-packed LSB first, one bit per element of `shape`
        dims = [int(d) for d in np.atleast_1d(shape)]
        bits = unpack_bits(mask, 1, int(np.prod(dims))).reshape(dims)
    else:  # iOS18: uint1 mask, one element per output element
        bits = np.asarray(mask)
    out = np.zeros(bits.shape, dtype=np.float32 if data.dtype.kind == "f" else data.dtype)
    out[bits != 0] = data
    return out


@mil_op("constexpr_cast")
def constexpr_cast(source_val, output_dtype="fp32"):
    """fp16 weights widened to fp32 (exact)."""
    return np.asarray(source_val, dtype=np.float32)


# --- activations (iOS17 quantize / dequantize: run at inference time) ---------------------------------


@mil_op("quantize")
def quantize(input, scale, output_dtype, zero_point=None, axis=None):
    """``clip(round(input / scale) + zero_point)`` in the integer dtype; round half to even (numpy's
    ``around``, what the coremltools definition computes)."""
    x = np.asarray(input, dtype=np.float32)
    dtype = str(output_dtype)
    if dtype not in ("int8", "uint8"):
        raise ValueError(f"quantize to '{dtype}' is not an iOS17 quantize output dtype")
    q = np.around(x / _along_axis(np.asarray(scale, dtype=np.float32), x.ndim, axis))
    if zero_point is not None:
        q = q + _along_axis(np.asarray(zero_point).astype(np.float32), x.ndim, axis)
    low, high = QUANT_RANGES[dtype]
    return np.clip(q, low, high).astype(np.dtype(dtype))


@mil_op("dequantize")
def dequantize(input, scale, zero_point=None, axis=None):
    """``scale * (input - zero_point)`` in float."""
    q = np.asarray(input).astype(np.float32)
    if zero_point is not None:
        q = q - _along_axis(np.asarray(zero_point).astype(np.float32), q.ndim, axis)
    return q * _along_axis(np.asarray(scale, dtype=np.float32), q.ndim, axis)
