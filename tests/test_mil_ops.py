"""The MIL reference executor's ops, one by one, against PyTorch (or the MIL docs' own examples).

Each op is called through the op table exactly as the executor calls it: MIL input names as keywords,
MIL defaults for what is left out. fp32 bound: 1e-5 relative to the output's peak (a few ulps of
float32 on sums of at most a few hundred terms).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgevit.export.backends.coreml.mil import OPS, round_fp16

RTOL = 1e-5


def op(name: str, **kwargs):
    return OPS[name](**kwargs)


def close(got, want, rtol: float = RTOL) -> None:
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    got = np.asarray(got)
    assert got.shape == want.shape, (got.shape, want.shape)
    peak = max(float(np.abs(want).max()), 1e-12) if want.size else 1.0
    assert float(np.abs(got.astype(np.float64) - want).max(initial=0.0)) <= rtol * peak


def rand(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def np_(t: torch.Tensor) -> np.ndarray:
    return t.numpy()


# --- linear algebra ---------------------------------------------------------------------------------

def test_linear_and_matmul() -> None:
    x, w, b = rand(2, 5, 8), rand(6, 8, seed=1), rand(6, seed=2)
    close(op("linear", x=np_(x), weight=np_(w), bias=np_(b)), F.linear(x, w, b))
    close(op("linear", x=np_(x), weight=np_(w)), F.linear(x, w))  # default bias: zeros
    a, c = rand(2, 3, 4, 5), rand(3, 6, 5, seed=1)
    close(op("matmul", x=np_(a), y=np_(c), transpose_y=True), a @ c.transpose(-1, -2))  # broadcast batch
    close(op("matmul", x=np_(a.transpose(-1, -2)), y=np_(c.transpose(-1, -2)), transpose_x=True),
          a @ c.transpose(-1, -2))


def test_einsum_apple_attention_equations() -> None:
    q, k = rand(1, 8, 1, 10), rand(1, 10, 1, 8, seed=1)
    close(op("einsum", values=[np_(q), np_(k)], equation="bchq,bkhc->bkhq"), torch.einsum("bchq,bkhc->bkhq", q, k))


# --- convolution and pooling ------------------------------------------------------------------------

@pytest.mark.parametrize("groups,stride,dilation", [(1, 1, 1), (2, 2, 1), (8, 1, 2), (8, 2, 1)])
def test_conv2d_custom_pad(groups: int, stride: int, dilation: int) -> None:
    x, w, b = rand(2, 8, 11, 9), rand(8, 8 // groups, 3, 3, seed=1), rand(8, seed=2)
    want = F.conv2d(F.pad(x, (2, 1, 1, 0)), w, b, stride=stride, dilation=dilation, groups=groups)
    got = op("conv", x=np_(x), weight=np_(w), bias=np_(b), strides=[stride, stride], pad_type="custom",
             pad=[1, 0, 2, 1], dilations=[dilation, dilation], groups=groups)  # pad: h_begin, h_end, w_begin, w_end
    close(got, want)


def test_conv_same_valid_and_1d() -> None:
    x, w = rand(1, 4, 10, 10), rand(6, 4, 3, 3, seed=1)
    close(op("conv", x=np_(x), weight=np_(w), pad_type="same"), F.conv2d(x, w, padding="same"))
    close(op("conv", x=np_(x), weight=np_(w)), F.conv2d(x, w))  # default pad_type: valid
    # same with stride 2 on an even size: total pad 1 -> (0 before, 1 after); same_lower -> (1, 0)
    got = op("conv", x=np_(x), weight=np_(w), pad_type="same", strides=[2, 2])
    close(got, F.conv2d(F.pad(x, (0, 1, 0, 1)), w, stride=2))
    got = op("conv", x=np_(x), weight=np_(w), pad_type="same_lower", strides=[2, 2])
    close(got, F.conv2d(F.pad(x, (1, 0, 1, 0)), w, stride=2))
    x1, w1 = rand(2, 3, 17), rand(5, 3, 4, seed=1)
    close(op("conv", x=np_(x1), weight=np_(w1), strides=[2]), F.conv1d(x1, w1, stride=2))


def test_conv_transpose() -> None:
    x, w, b = rand(1, 4, 5, 6), rand(4, 3, 3, 3, seed=1), rand(6, seed=2)
    want = F.conv_transpose2d(x, w, stride=2, padding=1)
    got = op("conv_transpose", x=np_(x), weight=np_(w), pad_type="custom", pad=[1, 1, 1, 1], strides=[2, 2])
    close(got, want)
    wg = rand(4, 3, 2, 2, seed=3)
    close(op("conv_transpose", x=np_(x), weight=np_(wg), bias=np_(b), strides=[2, 2], groups=2),
          F.conv_transpose2d(x, wg, b, stride=2, groups=2))


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_and_avg_pool(ceil_mode: bool) -> None:
    x = rand(1, 3, 9, 10)
    close(op("max_pool", x=np_(x), kernel_sizes=[3, 3], strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1],
             ceil_mode=ceil_mode), F.max_pool2d(x, 3, 2, 1, ceil_mode=ceil_mode))
    for exclude in (False, True):
        got = op("avg_pool", x=np_(x), kernel_sizes=[3, 3], strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1],
                 ceil_mode=ceil_mode, exclude_padding_from_average=exclude)
        close(got, F.avg_pool2d(x, 3, 2, 1, ceil_mode=ceil_mode, count_include_pad=not exclude))


# --- normalisation, softmax, activations ------------------------------------------------------------

def test_norms() -> None:
    x = rand(2, 6, 5, 7)
    mean, var, g, b = rand(6, seed=1), rand(6, seed=2).abs() + 0.1, rand(6, seed=3), rand(6, seed=4)
    close(op("batch_norm", x=np_(x), mean=np_(mean), variance=np_(var), gamma=np_(g), beta=np_(b), epsilon=1e-3),
          F.batch_norm(x, mean, var, g, b, eps=1e-3))
    close(op("instance_norm", x=np_(x), gamma=np_(g), beta=np_(b)), F.instance_norm(x, weight=g, bias=b))
    t, lg, lb = rand(2, 9, 16), rand(16, seed=5), rand(16, seed=6)
    close(op("layer_norm", x=np_(t), axes=[-1], gamma=np_(lg), beta=np_(lb), epsilon=1e-6),
          F.layer_norm(t, (16,), lg, lb, eps=1e-6))
    # channel layer norm of (B, C, 1, S) (the ANE layout): axes [1], gamma of shape (C,)
    c, cg = rand(2, 6, 1, 5), rand(6, seed=7)
    want = F.layer_norm(c.permute(0, 2, 3, 1), (6,), cg).permute(0, 3, 1, 2)
    close(op("layer_norm", x=np_(c), axes=[1], gamma=np_(cg)), want)
    close(op("layer_norm", x=np_(t)), F.layer_norm(t, t.shape))  # default axes: all


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax(axis: int) -> None:
    x = rand(2, 5, 7) * 30  # large logits: the max shift matters
    close(op("softmax", x=np_(x), axis=axis), torch.softmax(x, axis))


def test_activations() -> None:
    x = rand(4, 50) * 4
    close(op("gelu", x=np_(x)), F.gelu(x))  # default mode EXACT
    close(op("gelu", x=np_(x), mode="TANH_APPROXIMATION"), F.gelu(x, approximate="tanh"))
    close(op("gelu", x=np_(x), mode="SIGMOID_APPROXIMATION"), x * torch.sigmoid(1.702 * x))
    close(op("relu", x=np_(x)), F.relu(x))
    close(op("relu6", x=np_(x)), F.relu6(x))
    close(op("silu", x=np_(x)), F.silu(x))
    close(op("sigmoid", x=np_(x * 30)), torch.sigmoid(x * 30))  # no overflow warning path
    close(op("sigmoid_hard", x=np_(x), alpha=1 / 6, beta=0.5), F.hardsigmoid(x))
    close(op("leaky_relu", x=np_(x), alpha=0.1), F.leaky_relu(x, 0.1))
    close(op("elu", x=np_(x), alpha=1.0), F.elu(x))
    close(op("softplus", x=np_(x)), F.softplus(x))
    close(op("erf", x=np_(x)), torch.erf(x))
    close(op("tanh", x=np_(x)), torch.tanh(x))
    close(op("clip", x=np_(x), alpha=-1.0, beta=2.0), x.clamp(-1, 2))


# --- elementwise, reductions, cast --------------------------------------------------------------------

def test_elementwise_binary_broadcast() -> None:
    a, b = rand(2, 1, 5), rand(3, 1, seed=1).abs() + 0.5
    for name, ref in (("add", a + b), ("sub", a - b), ("mul", a * b), ("real_div", a / b),
                      ("maximum", torch.maximum(a, b)), ("minimum", torch.minimum(a, b)),
                      ("pow", b ** a), ("floor_div", torch.floor(a / b))):
        x, y = (b, a) if name == "pow" else (a, b)
        close(op(name, x=np_(x), y=np_(y)), ref)
    assert np.array_equal(op("greater", x=np_(a), y=np_(b)), (a > b).numpy())
    assert np.array_equal(op("equal", x=np.array([1, 2]), y=np.array([1, 3])), [True, False])


def test_unary_with_epsilon_defaults() -> None:
    x = rand(3, 4).abs() + 0.1
    close(op("rsqrt", x=np_(x)), torch.rsqrt(x + 1e-12))
    close(op("inverse", x=np_(x)), 1 / (x + 1e-4))  # MIL default epsilon 1e-4
    close(op("log", x=np_(x)), torch.log(x))
    close(op("sqrt", x=np_(x)), torch.sqrt(x))
    close(op("exp", x=np_(x)), torch.exp(x))


def test_reductions() -> None:
    x = rand(2, 3, 4)
    close(op("reduce_mean", x=np_(x), axes=[-1], keep_dims=True), x.mean(-1, keepdim=True))
    close(op("reduce_sum", x=np_(x), axes=[0, 2]), x.sum((0, 2)))
    close(op("reduce_max", x=np_(x)), x.amax())  # default axes: all
    close(op("reduce_min", x=np_(x), axes=[1]), x.amin(1))
    close(op("reduce_l2_norm", x=np_(x), axes=[-1]), x.norm(dim=-1))
    close(op("reduce_log_sum_exp", x=np_(x * 50), axes=[1]), torch.logsumexp(x * 50, 1))
    assert np.array_equal(op("reduce_argmax", x=np_(x), axis=1), x.argmax(1).numpy())


def test_cast() -> None:
    x = np.array([1.7, -1.7, 65504.0, 1e5], dtype=np.float32)
    assert np.array_equal(op("cast", x=x, dtype="int32"), [1, -1, 65504, 100000])  # truncation
    assert op("cast", x=x, dtype="fp16").dtype == np.float32  # fp16 values live in float32 arrays
    assert np.isinf(round_fp16(x)[3]) and round_fp16(x)[2] == 65504.0


# --- shape and indexing ---------------------------------------------------------------------------

def test_reshape_ios17_zero_rule() -> None:
    x = np.zeros((2, 50), dtype=np.float32)
    assert op("reshape", x=x, shape=[1, 0, -1, 0]).shape == (1, 1, 2, 50)  # the MIL docs' example
    assert op("reshape", x=np.zeros((2, 3, 4)), shape=[0, -1]).shape == (3, 8)  # 0 matches from the right


def test_transpose_split_concat() -> None:
    x = rand(2, 6, 3)
    close(op("transpose", x=np_(x), perm=[2, 0, 1]), x.permute(2, 0, 1))
    parts = op("split", x=np_(x), axis=1, num_splits=3)
    for got, want in zip(parts, x.chunk(3, 1)):
        close(got, want)
    parts = op("split", x=np_(x), axis=1, split_sizes=[1, 5])
    for got, want in zip(parts, x.split([1, 5], 1)):
        close(got, want)
    a = np.array([[1, 2], [3, 4], [5, 6]])
    b = np.array([[7, 8], [9, 10], [11, 12]])
    assert np.array_equal(op("concat", values=[a, b], axis=0), np.concatenate([a, b]))
    assert np.array_equal(op("concat", values=[a, b], axis=0, interleave=True),
                          [[1, 2], [7, 8], [3, 4], [9, 10], [5, 6], [11, 12]])  # the MIL docs' example


def test_slice_by_index_masks_and_slice_by_size() -> None:
    x = rand(4, 5, 6)
    close(op("slice_by_index", x=np_(x), begin=[1, 0, 2], end=[3, 5, -1], stride=[1, 2, 1]), x[1:3, 0:5:2, 2:-1])
    got = op("slice_by_index", x=np_(x), begin=[9, 1, 0], end=[0, 0, 4], begin_mask=[True, False, False],
             end_mask=[False, True, False], squeeze_mask=[False, False, True])
    close(got, x[:0, 1:, 0])  # begin masked, end masked, dim 2 indexed (squeezed) at begin
    close(op("slice_by_size", x=np_(x), begin=[1, 2, 0], size=[2, -1, 3]), x[1:3, 2:, 0:3])


def test_gather_family() -> None:
    x = rand(3, 5, 4)
    idx = torch.tensor([[0, 4], [2, -1]])
    close(op("gather", x=np_(x), indices=idx.numpy(), axis=1), x[:, idx.remainder(5)])
    bidx = torch.tensor([[1, 0], [4, 4], [2, 3]])
    got = op("gather", x=np_(x), indices=bidx.numpy(), axis=1, batch_dims=1)
    close(got, torch.stack([x[i, bidx[i]] for i in range(3)]))
    along = torch.randint(0, 5, (3, 2, 4), generator=torch.Generator().manual_seed(1))
    close(op("gather_along_axis", x=np_(x), indices=along.numpy(), axis=1), torch.gather(x, 1, along))
    close(op("gather_nd", x=np_(x), indices=np.array([[0, 1], [2, 4]])), torch.stack([x[0, 1], x[2, 4]]))


@pytest.mark.parametrize("mode", ["update", "add"])
def test_scatter_along_axis(mode: str) -> None:
    data, upd = rand(3, 6), rand(3, 2, seed=1)
    idx = torch.tensor([[0, 5], [2, 2], [1, 4]]) if mode == "add" else torch.tensor([[0, 5], [2, 3], [1, 4]])
    want = data.scatter_add(1, idx, upd) if mode == "add" else data.scatter(1, idx, upd)
    close(op("scatter_along_axis", data=np_(data), indices=idx.numpy(), updates=np_(upd), axis=1, mode=mode), want)


def test_topk_and_argsort() -> None:
    x = rand(3, 10)
    values, indices = op("topk", x=np_(x), k=4, axis=-1)
    want = torch.topk(x, 4, dim=-1)
    close(values, want.values)
    assert np.array_equal(indices, want.indices.numpy()) and indices.dtype == np.int32
    values, _ = op("topk", x=np_(x), k=2, axis=0, ascending=True)
    close(values, torch.topk(x, 2, dim=0, largest=False).values)
    assert np.array_equal(op("topk", x=np.array([1.0, 3.0, 3.0, 2.0]), k=2)[1], [1, 2])  # ties: lower index first
    assert np.array_equal(op("argsort", x=np_(x), axis=1), torch.argsort(x, 1, descending=True).numpy())


def test_pad_modes() -> None:
    x = rand(1, 2, 4, 5)
    close(op("pad", x=np_(x), pad=[1, 2, 0, 3]), F.pad(x, (0, 3, 1, 2)))
    close(op("pad", x=np_(x), pad=[1, 2, 2, 1], mode="reflect"), F.pad(x, (2, 1, 1, 2), mode="reflect"))
    close(op("pad", x=np_(x), pad=[1, 2, 2, 1], mode="replicate"), F.pad(x, (2, 1, 1, 2), mode="replicate"))


def test_shape_utilities() -> None:
    x = rand(2, 1, 3)
    assert op("expand_dims", x=np_(x), axes=[0, -1]).shape == (1, 2, 1, 3, 1)
    assert op("squeeze", x=np_(x), axes=[1]).shape == (2, 3)
    assert op("squeeze", x=np_(x)).shape == (2, 3)
    close(op("tile", x=np_(x), reps=[1, 2, 2]), x.repeat(1, 2, 2))
    assert np.array_equal(op("shape", x=np_(x)), [2, 1, 3])
    close(op("cumsum", x=np_(x), axis=2), x.cumsum(2))
    close(op("cumsum", x=np_(x), axis=2, exclusive=True, reverse=True), x.flip(2).cumsum(2).flip(2) - x)
    m = rand(4, 4)
    close(op("band_part", x=np_(m), lower=0, upper=-1), torch.triu(m))


# --- channel/space rearrangement and resampling -------------------------------------------------------

def test_pixel_shuffle_family() -> None:
    x = rand(1, 8, 3, 5)
    close(op("pixel_shuffle", x=np_(x), upscale_factor=2), F.pixel_shuffle(x, 2))
    y = rand(1, 2, 6, 4)
    close(op("pixel_unshuffle", x=np_(y), downscale_factor=2), F.pixel_unshuffle(y, 2))
    # TensorFlow's order: channel = (block row * b + block col) * C + c
    deep = op("space_to_depth", x=np_(y), block_size=2)
    assert deep.shape == (1, 8, 3, 2) and deep[0, (1 * 2 + 0) * 2 + 0, 1, 1] == np_(y)[0, 0, 3, 2]
    close(op("depth_to_space", x=deep, block_size=2), y)


def test_upsampling_matches_torch_interpolate() -> None:
    x = rand(1, 2, 5, 7)
    close(op("upsample_nearest_neighbor", x=np_(x), scale_factor_height=2, scale_factor_width=3),
          F.interpolate(x, scale_factor=(2, 3), mode="nearest"))
    close(op("upsample_bilinear", x=np_(x), scale_factor_height=2, scale_factor_width=2, align_corners=True),
          F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))
    close(op("upsample_bilinear", x=np_(x), scale_factor_height=2, scale_factor_width=2, align_corners=False),
          F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
    close(op("resize_bilinear", x=np_(x), target_size_height=9, target_size_width=4, sampling_mode="UNALIGN_CORNERS"),
          F.interpolate(x, size=(9, 4), mode="bilinear", align_corners=False))
    close(op("resize_bilinear", x=np_(x), target_size_height=9, target_size_width=4,
             sampling_mode="STRICT_ALIGN_CORNERS"), F.interpolate(x, size=(9, 4), mode="bilinear", align_corners=True))


def test_resize_bilinear_grids_are_the_mil_docs_examples() -> None:
    from edgevit.export.backends.coreml.mil.ops_tensor import _grid

    docs = {("UNALIGN_CORNERS", 5): [0.0, 0.1, 0.5, 0.9, 1.0], ("ALIGN_CORNERS", 5): [0.0, 0.25, 0.5, 0.75, 1.0],
            ("DEFAULT", 5): [0.0, 0.4, 0.8, 1.0, 1.0], ("OFFSET_CORNERS", 5): [0.1, 0.3, 0.5, 0.7, 0.9],
            ("DEFAULT", 6): [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0]}
    for (mode, n), grid in docs.items():
        assert np.allclose(_grid(2, n, mode), grid), mode


def test_every_op_has_a_test_here() -> None:
    """Guard: an op added to the table without a test in this file (or, for the quantized packages' ops, in
    test_mil_quant_ops.py) fails (names are matched textually)."""
    import pathlib

    here = pathlib.Path(__file__)
    source = here.read_text() + (here.parent / "test_mil_quant_ops.py").read_text()
    exempt = {  # thin numpy wrappers or aliases covered through a sibling's test
        "acos", "asin", "atan", "atanh", "ceil", "cos", "cosh", "exp2", "floor", "logical_not", "round", "sign",
        "sin", "sinh", "square", "tan", "abs", "mod", "not_equal", "greater_equal", "less", "less_equal",
        "logical_and", "logical_or", "logical_xor", "reduce_prod", "reduce_l1_norm", "reduce_sum_square",
        "reduce_log_sum", "reduce_argmin", "threshold", "select", "identity", "flatten2d", "fill", "range_1d",
        "reverse", "stack", "scatter", "scatter_nd", "non_zero", "one_hot",
        "resize_nearest_neighbor", "resize", "l2_pool", "l2_norm", "softsign", "prelu", "scaled_tanh",
        "linear_activation", "thresholded_relu", "clamped_relu", "scaled_dot_product_attention",
    }
    untested = [name for name in OPS if name not in exempt and f'"{name}"' not in source]
    assert not untested, untested
