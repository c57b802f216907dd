"""The MIL reference executor's quantization ops against their coremltools definitions.

Each op is called through the op table as the executor calls it and compared with the numpy reference
of its coremltools op definition (``decompress`` of the constexpr ops, the value inference of iOS17
``quantize``/``dequantize``) on random data, over the dtypes coremltools stores (int4/uint4 as one
int8/uint8 per element with sub-byte metadata, int8, uint8) and per-tensor / per-channel (axis) /
per-block / vector variants. The last tests save real packages with those ops and run them through
``load_program`` + ``MILExecutor``: the values as the milproto loader hands them over (bit-packed iOS16
indices and masks, unpacked iOS18 sub-byte data).
"""

from __future__ import annotations

import numpy as np
import pytest

from edgevit.export.backends.coreml.mil import OPS, MILExecutor, load_program

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402
from coremltools.converters.mil.mil.ops.defs.iOS16 import constexpr_ops as ios16  # noqa: E402
from coremltools.converters.mil.mil.ops.defs.iOS18 import compression as ios18  # noqa: E402
from coremltools.optimize import _utils as ct_utils  # noqa: E402

RTOL = 1e-6
# numpy dtypes as coremltools stores each MIL integer type (sub-byte types carry metadata)
NP = {"int4": types.np_int4_dtype, "uint4": types.np_uint4_dtype, "int8": np.dtype(np.int8),
      "uint8": np.dtype(np.uint8)}
RANGES = {"int4": (-8, 7), "uint4": (0, 15), "int8": (-128, 127), "uint8": (0, 255)}


def op(name: str, **kwargs):
    return OPS[name](**kwargs)


def close(got, want, rtol: float = RTOL) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    peak = max(float(np.abs(want.astype(np.float64)).max()), 1e-12)
    assert float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()) <= rtol * peak


def ints(rng: np.random.Generator, dtype: str, shape) -> np.ndarray:
    low, high = RANGES[dtype]
    return rng.integers(low, high + 1, shape).astype(NP[dtype])


def scales(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.uniform(0.01, 0.2, shape).astype(np.float32)


def mil_value(opset, build):
    """The value coremltools' own op definition infers for ``build()`` (const inputs) in a program."""
    got = {}

    @mb.program(input_specs=[mb.TensorSpec((1,))], opset_version=opset)
    def prog(x):
        var = build()
        got["val"] = var.val if var.val is not None else var.op.materialized_val_inference()
        return x

    return got["val"]


# --- iOS16 constexpr_affine_dequantize -------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["int8", "uint8"])
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("vector", [True, False])
def test_affine_dequantize(dtype: str, axis: int, vector: bool) -> None:
    rng = np.random.default_rng(axis + 3)
    data = ints(rng, dtype, (6, 5, 4))
    n = data.shape[axis]
    scale = scales(rng, (n,) if vector else ())
    zero = ints(rng, dtype, (n,) if vector else ())
    want = ios16.constexpr_affine_dequantize.decompress(data, zero, scale, axis)
    close(op("constexpr_affine_dequantize", quantized_data=data, zero_point=zero, scale=scale, axis=np.int32(axis)),
          want)


def test_affine_dequantize_float_zero_point() -> None:
    rng = np.random.default_rng(1)
    data, scale = ints(rng, "int8", (8, 3)), scales(rng, (8,))
    zero = rng.uniform(-3, 3, (8,)).astype(np.float32)  # ZeroPointT includes fp32
    close(op("constexpr_affine_dequantize", quantized_data=data, zero_point=zero, scale=scale, axis=0),
          ios16.constexpr_affine_dequantize.decompress(data, zero, scale, 0))


# --- iOS18 constexpr_blockwise_shift_scale ---------------------------------------------------------

BLOCKINGS = {  # data shape -> scale shape
    "per_tensor": ((16, 64), (1, 1)),
    "per_channel": ((16, 64), (16, 1)),
    "per_block_32": ((16, 64), (16, 2)),
    "conv_per_block": ((8, 64, 3, 3), (8, 2, 1, 1)),
    "both_axes": ((16, 64), (4, 8)),
}


@pytest.mark.parametrize("dtype", ["int4", "uint4", "int8", "uint8"])
@pytest.mark.parametrize("blocking", sorted(BLOCKINGS))
@pytest.mark.parametrize("offset_kind", ["none", "same_dtype", "float"])
def test_blockwise_shift_scale(dtype: str, blocking: str, offset_kind: str) -> None:
    rng = np.random.default_rng(len(blocking) + len(dtype))
    data_shape, scale_shape = BLOCKINGS[blocking]
    data, scale = ints(rng, dtype, data_shape), scales(rng, scale_shape)
    offset = {"none": None, "same_dtype": ints(rng, dtype, scale_shape),
              "float": rng.uniform(-2, 2, scale_shape).astype(np.float32)}[offset_kind]
    want = ios18.constexpr_blockwise_shift_scale.decompress(data, scale, offset)
    close(op("constexpr_blockwise_shift_scale", data=data, scale=scale, offset=offset), want)


def test_blockwise_shift_scale_rejects_blocks_that_do_not_divide() -> None:
    with pytest.raises(ValueError, match="do not divide"):
        op("constexpr_blockwise_shift_scale", data=np.zeros((4, 6), np.int8), scale=np.ones((4, 4), np.float32))


# --- constexpr_lut_to_dense: iOS16 (bit-packed indices) and iOS18 (per-block / vector LUTs) ----------

@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 6, 8])
def test_lut_to_dense_ios16_packed(nbits: int) -> None:
    rng = np.random.default_rng(nbits)
    shape = (5, 7, 3)  # 105 elements: the last byte is partly padding for most nbits
    lut = rng.standard_normal(2**nbits).astype(np.float32)
    indices = rng.integers(0, 2**nbits, int(np.prod(shape))).astype(np.uint8)
    packed = ct_utils.pack_elements_into_bits(indices, nbits)
    want = ios16.constexpr_lut_to_dense.decompress(lut, packed, np.array(shape, np.uint32))
    close(op("constexpr_lut_to_dense", indices=packed, lut=lut, shape=np.array(shape, np.uint32)), want)


@pytest.mark.parametrize("lut_blocks,vector,vector_axis", [
    ((1, 1), 1, None),  # per tensor
    ((4, 1), 1, None),  # grouped along output channels
    ((2, 3), 1, None),  # blocks on both axes
    ((1, 1), 2, 0),  # vector palettization along axis 0
    ((2, 1), 4, 1),  # grouped + vector along axis 1
])
@pytest.mark.parametrize("nbits,lut_dtype", [(4, np.float32), (2, np.float32), (4, np.int8)])
def test_lut_to_dense_ios18(lut_blocks, vector: int, vector_axis, nbits: int, lut_dtype) -> None:
    rng = np.random.default_rng(nbits + vector)
    indices_shape = (8, 6)
    indices = rng.integers(0, 2**nbits, indices_shape).astype(types.np_uint4_dtype if nbits == 4 else np.uint8)
    lut_shape = (*lut_blocks, 2**nbits, vector)
    lut = (rng.standard_normal(lut_shape) * 20).astype(lut_dtype)
    want = ios18.constexpr_lut_to_dense.decompress(indices, lut, vector_axis)
    got = op("constexpr_lut_to_dense", indices=indices, lut=lut, vector_axis=vector_axis)
    close(got, want)


# --- constexpr_sparse_to_dense (prune_weights) and constexpr_cast ----------------------------------

def test_sparse_to_dense_ios16_and_ios18() -> None:
    rng = np.random.default_rng(3)
    shape = (6, 7)
    dense_mask = rng.random(shape) < 0.4
    values = rng.standard_normal(int(dense_mask.sum())).astype(np.float32)
    packed = np.packbits(dense_mask.ravel(), bitorder="little")
    close(op("constexpr_sparse_to_dense", nonzero_data=values, mask=packed, shape=np.array(shape, np.uint32)),
          ios16.constexpr_sparse_to_dense.decompress(values, packed, np.array(shape)))
    mask18 = dense_mask.astype(np.uint8)
    close(op("constexpr_sparse_to_dense", nonzero_data=values, mask=mask18),
          ios18.constexpr_sparse_to_dense.decompress(values, mask18))


def test_constexpr_cast() -> None:
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float16)
    got = op("constexpr_cast", source_val=x, output_dtype="fp32")
    assert got.dtype == np.float32 and np.array_equal(got, x.astype(np.float32))


# --- iOS17 quantize / dequantize (activations) -----------------------------------------------------

@pytest.mark.parametrize("dtype", ["int8", "uint8"])
@pytest.mark.parametrize("axis", [None, 0, 2, -1])
@pytest.mark.parametrize("with_zero_point", [True, False])
def test_quantize_and_dequantize(dtype: str, axis, with_zero_point: bool) -> None:
    rng = np.random.default_rng(7)
    shape = (3, 4, 5)
    n = 1 if axis is None else shape[axis]
    scale = scales(rng, () if axis is None else (n,))
    zero = ints(rng, dtype, () if axis is None else (n,)) if with_zero_point else None
    x = rng.standard_normal(shape).astype(np.float32) * 20
    # exact half steps: the rounding rule (half to even) must match; and values beyond the int range clip
    scale_b = scale if axis is None else scale.reshape([n if i == axis % 3 else 1 for i in range(3)])
    x[0, 0, :] = (np.array([0.5, 1.5, 2.5, -0.5, -1.5]) * np.broadcast_to(scale_b, shape)[0, 0, :]).astype(np.float32)
    x[1, 1, :2] = 1e4
    kwargs = {"scale": scale, "output_dtype": dtype}
    if zero is not None:
        kwargs["zero_point"] = zero
    if axis is not None:
        kwargs["axis"] = np.int32(axis)
    want_q = mil_value(ct.target.iOS17, lambda: mb.quantize(input=x, **kwargs))
    got_q = op("quantize", input=x, **kwargs)
    assert got_q.dtype == np.dtype(dtype) and np.array_equal(got_q, want_q)
    dq = {k: v for k, v in kwargs.items() if k != "output_dtype"}
    want = mil_value(ct.target.iOS17, lambda: mb.dequantize(input=want_q, **dq))
    close(op("dequantize", input=got_q, **dq), want)


# --- the ops as saved packages hand them over (milproto loader) ------------------------------------

def _run_package(tmp_path, prog, opset, x: np.ndarray) -> list[np.ndarray]:
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=opset,
                       compute_precision=ct.precision.FLOAT32, skip_model_load=True)
    path = tmp_path / "ops.mlpackage"
    model.save(str(path))
    program = load_program(path)
    return MILExecutor(program, "fp32").run([x]), program


def test_ios18_package_int4_uint4_and_activation_quantization(tmp_path) -> None:
    rng = np.random.default_rng(0)
    data, scale, offset = ints(rng, "int4", (8, 64)), scales(rng, (8, 2)), ints(rng, "int4", (8, 2))
    data_u, scale_u = ints(rng, "uint4", (8, 64)), scales(rng, (1, 64))
    indices, lut = ints(rng, "uint4", (8, 64)), rng.standard_normal((2, 1, 16, 1)).astype(np.float32)
    indices_v, lut_v = ints(rng, "uint4", (4, 64)), rng.standard_normal((1, 1, 16, 2)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec((8, 64))], opset_version=ct.target.iOS18)
    def prog(x):
        a = mb.add(x=x, y=mb.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=offset))
        b = mb.add(x=x, y=mb.constexpr_blockwise_shift_scale(data=data_u, scale=scale_u))
        c = mb.add(x=x, y=mb.constexpr_lut_to_dense(indices=indices, lut=lut))
        d = mb.add(x=x, y=mb.constexpr_lut_to_dense(indices=indices_v, lut=lut_v, vector_axis=0))
        q = mb.quantize(input=x, scale=np.float32(0.05), zero_point=np.int8(3), output_dtype="int8")
        return a, b, c, d, mb.dequantize(input=q, scale=np.float32(0.05), zero_point=np.int8(3))

    x = np.zeros((8, 64), np.float32)
    x[0, :5] = [0.025, 0.075, -0.025, 100.0, -100.0]  # half steps round to even; beyond the range clips
    outs, program = _run_package(tmp_path, prog, ct.target.iOS18, x)
    assert {"constexpr_blockwise_shift_scale", "constexpr_lut_to_dense", "quantize", "dequantize"} <= set(
        program.op_types())
    close(outs[0] - x, ios18.constexpr_blockwise_shift_scale.decompress(data, scale, offset), rtol=1e-5)
    close(outs[1] - x, ios18.constexpr_blockwise_shift_scale.decompress(data_u, scale_u, None), rtol=1e-5)
    close(outs[2] - x, ios18.constexpr_lut_to_dense.decompress(indices, lut, None), rtol=1e-5)
    close(outs[3] - x, ios18.constexpr_lut_to_dense.decompress(indices_v, lut_v, 0), rtol=1e-5)
    q = ct_utils.quantize_by_scale_and_zp(x, np.float32(0.05), np.int8(3), types.int8)
    close(outs[4], ct_utils.dequantize_by_scale_and_zp(q, np.float32(0.05), np.int8(3)))
    assert outs[4][0, 3] == pytest.approx(0.05 * (127 - 3)) and outs[4][0, 4] == pytest.approx(0.05 * (-128 - 3))


def test_ios17_package_affine_lut_and_sparse(tmp_path) -> None:
    rng = np.random.default_rng(1)
    q8, zero, scale = ints(rng, "uint8", (8, 64)), ints(rng, "uint8", (64,)), scales(rng, (64,))
    lut = rng.standard_normal(16).astype(np.float32)
    raw = rng.integers(0, 16, 8 * 64).astype(np.uint8)
    packed = ct_utils.pack_elements_into_bits(raw, 4)
    mask = rng.random((8, 64)) < 0.3
    values = rng.standard_normal(int(mask.sum())).astype(np.float32)
    mask_packed = np.packbits(mask.ravel(), bitorder="little")
    shape = np.array([8, 64], np.uint32)

    @mb.program(input_specs=[mb.TensorSpec((8, 64))], opset_version=ct.target.iOS17)
    def prog(x):
        a = mb.add(x=x, y=mb.constexpr_affine_dequantize(quantized_data=q8, zero_point=zero, scale=scale, axis=1))
        b = mb.add(x=x, y=mb.constexpr_lut_to_dense(indices=packed, lut=lut, shape=shape))
        c = mb.add(x=x, y=mb.constexpr_sparse_to_dense(nonzero_data=values, mask=mask_packed, shape=shape))
        return a, b, c

    outs, program = _run_package(tmp_path, prog, ct.target.iOS17, np.zeros((8, 64), np.float32))
    assert {"constexpr_affine_dequantize", "constexpr_lut_to_dense", "constexpr_sparse_to_dense"} <= set(
        program.op_types())
    close(outs[0], ios16.constexpr_affine_dequantize.decompress(q8, zero, scale, 1))
    close(outs[1], ios16.constexpr_lut_to_dense.decompress(lut, packed, shape))
    close(outs[2], ios16.constexpr_sparse_to_dense.decompress(values, mask_packed, shape))
