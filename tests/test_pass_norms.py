"""Norm and reduction passes: numerics on tiny modules, and the accelerator limit each works around."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from edgevit.export.passes import run_pipeline
from edgevit.export.passes.base import aten, is_op
from edgevit.export.targets import get_target

F32_EPS = torch.finfo(torch.float32).eps


def count(program: torch.export.ExportedProgram, *ops: object) -> int:
    return sum(is_op(n, *ops) for n in program.graph.nodes)


def outputs(model: nn.Module, rewritten: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(x), rewritten(x)


def coverage(model: nn.Module, x: torch.Tensor, names: list[str], path: Path, accelerator: str):
    """ORT mobile-checker coverage of ``model`` exported to ONNX after ``names``."""
    from edgevit.export.backends.onnx.coverage import onnx_ep_coverage

    r = run_pipeline(model, (x,), names)
    get_target("onnx").converter_module().convert(r.program, (x,), path, "fp32")
    return onnx_ep_coverage(path, accelerator)


def randomise(norm: nn.Module) -> nn.Module:
    """Non-trivial affine parameters and running statistics, so folding/affine mistakes show."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if getattr(norm, "weight", None) is not None:
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) * 1.5 + 0.5)
            norm.bias.copy_(torch.rand(norm.bias.shape, generator=g) * 2 - 1)
        if getattr(norm, "running_mean", None) is not None:
            norm.running_mean.copy_(torch.rand(norm.running_mean.shape, generator=g) * 2 - 1)
            norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=g) * 1.5 + 0.5)
    return norm.eval()


def norm_tolerance(x: torch.Tensor, dims: list[int], ref: torch.Tensor) -> float:
    """fp32 rounding of a normalisation: the inputs carry ulp(|x|), amplified by |mean|/std when
    centring (cancellation), so |Δ| <= 16 eps (1 + |mean|/std) max|out| (~2e-6 relative when centred)."""
    mean, std = x.double().mean(dims, keepdim=True), x.double().std(dims, keepdim=True, unbiased=False)
    cond = 1 + (mean.abs() / std).max().item()
    return 16 * F32_EPS * cond * ref.abs().max().item()


# --- decompose_layer_norm -------------------------------------------------------------------------

@pytest.mark.parametrize("shape, normalized, affine", [
    ((2, 5, 16), [16], True), ((2, 3, 4, 8), [4, 8], True), ((1, 50, 192), [192], True),
    ((3, 16), [16], False),
])
@pytest.mark.parametrize("offset", [0.0, 10.0, 1000.0])
def test_decompose_layer_norm_equivalence(shape, normalized, affine, offset) -> None:
    torch.manual_seed(0)
    model = randomise(nn.LayerNorm(normalized, elementwise_affine=affine))
    x = torch.randn(shape) * 3 + offset
    r = run_pipeline(model, (x,), ["decompose_layer_norm"])
    assert r.reports[0].sites == 1 and count(r.program, aten.layer_norm) == 0
    assert count(r.program, aten.rsqrt, aten.var, aten.pow) == 0  # only NNAPI-listed primitives
    ref, out = outputs(model, r.model, x)
    dims = list(range(len(shape) - len(normalized), len(shape)))
    assert (out - ref).abs().max().item() <= norm_tolerance(x, dims, ref)


@pytest.mark.slow
def test_decompose_layer_norm_reason_nnapi(tmp_path: Path) -> None:
    model, x = randomise(nn.LayerNorm(16)), torch.randn(1, 8, 16)
    before = coverage(model, x, [], tmp_path / "without.onnx", "nnapi")
    assert before.unsupported == {"LayerNormalization": 1} and not before.whole
    after = coverage(model, x, ["decompose_layer_norm"], tmp_path / "with.onnx", "nnapi")
    assert after.unsupported == {} and after.whole


# --- decompose_group_norm -------------------------------------------------------------------------

@pytest.mark.parametrize("shape, groups, affine", [
    ((2, 8, 5, 5), 4, True), ((2, 8, 5, 5), 1, True), ((2, 8, 5, 5), 8, True), ((1, 16, 7, 3), 1, False),
    ((2, 6, 10), 3, True), ((4, 6), 2, True),
])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_decompose_group_norm_equivalence(shape, groups, affine, offset) -> None:
    torch.manual_seed(0)
    model = randomise(nn.GroupNorm(groups, shape[1], affine=affine))
    x = torch.randn(shape) * 3 + offset
    r = run_pipeline(model, (x,), ["decompose_group_norm"])
    assert r.reports[0].sites == 1 and count(r.program, aten.group_norm, aten.native_group_norm) == 0
    assert max(len(n.meta["val"].shape) for n in r.program.graph.nodes
               if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)) <= 4
    ref, out = outputs(model, r.model, x)
    grouped = x.reshape(shape[0], groups, -1)
    assert (out - ref).abs().max().item() <= norm_tolerance(grouped, [2], ref)


def test_decompose_group_norm_leaves_rank5_alone() -> None:
    model, x = randomise(nn.GroupNorm(2, 4)), torch.randn(1, 4, 2, 3, 3)
    r = run_pipeline(model, (x,), ["decompose_group_norm"])
    assert r.reports[0].sites == 0 and count(r.program, aten.group_norm) == 1


@pytest.mark.slow
def test_decompose_group_norm_reason_nnapi(tmp_path: Path) -> None:
    """group_norm exports as InstanceNormalization (for G=1 too), which NNAPI lacks."""
    class TwoNorms(nn.Module):
        def __init__(self):
            super().__init__()
            self.gn1, self.gn4 = randomise(nn.GroupNorm(1, 8)), randomise(nn.GroupNorm(4, 8))

        def forward(self, x):
            return self.gn4(self.gn1(x))

    model, x = TwoNorms().eval(), torch.randn(1, 8, 6, 6)
    before = coverage(model, x, [], tmp_path / "without.onnx", "nnapi")
    assert before.unsupported == {"InstanceNormalization": 2} and not before.whole
    after = coverage(model, x, ["decompose_group_norm"], tmp_path / "with.onnx", "nnapi")
    assert after.unsupported == {} and after.whole


# --- sum_to_mean ----------------------------------------------------------------------------------

class Sum(nn.Module):
    def __init__(self, dims, keepdim: bool = False):
        super().__init__()
        self.dims, self.keepdim = dims, keepdim

    def forward(self, x):
        return x.sum() if self.dims is None else x.sum(self.dims, keepdim=self.keepdim)


@pytest.mark.parametrize("shape, dims", [
    ((2, 8, 16), -1), ((2, 8, 16), [1, 2]), ((4, 4, 4), [0, 2]), ((3, 8), None),  # N a power of two
    ((2, 5, 3), 1), ((2, 5, 3), [1, 2]), ((3, 7), None),
])
@pytest.mark.parametrize("keepdim", [False, True])
def test_sum_to_mean_equivalence(shape, dims, keepdim) -> None:
    torch.manual_seed(0)
    model, x = Sum(dims, keepdim), torch.randn(shape)
    r = run_pipeline(model, (x,), ["sum_to_mean"])
    assert r.reports[0].sites == 1 and count(r.program, aten.sum) == 0
    ref, out = outputs(model, r.model, x)
    assert out.shape == ref.shape
    reduced = [d % len(shape) for d in ([dims] if isinstance(dims, int) else dims or range(len(shape)))]
    n = 1
    for d in reduced:
        n *= shape[d]
    if n & (n - 1) == 0:
        assert torch.equal(out, ref)  # sum/N and *N are exact for a power of two
    else:
        # torch's mean is fl(sum / N); fl(mean * N) adds one rounding: within 1 eps of |sum| per element.
        assert ((out - ref).abs() <= F32_EPS * ref.abs()).all()


def test_sum_to_mean_leaves_int_and_dtype_changing_sums_alone() -> None:
    class Sums(nn.Module):
        def forward(self, x):
            mask = (x > 0).long().sum(-1)  # an integer sum: mean would change its dtype
            wide = x.sum(-1, dtype=torch.float64)  # a dtype-changing sum
            return mask, wide

    x = torch.randn(2, 6)
    r = run_pipeline(Sums(), (x,), ["sum_to_mean"])
    assert r.reports[0].sites == 0 and count(r.program, aten.sum) == 2


@pytest.mark.slow
def test_sum_to_mean_reason_nnapi(tmp_path: Path) -> None:
    model, x = Sum([-1]), torch.randn(1, 4, 16)
    before = coverage(model, x, [], tmp_path / "without.onnx", "nnapi")
    assert before.unsupported == {"ReduceSum": 1} and not before.whole
    after = coverage(model, x, ["sum_to_mean"], tmp_path / "with.onnx", "nnapi")
    assert after.unsupported == {} and after.whole


# --- fold_batchnorm -------------------------------------------------------------------------------

class ConvBn(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module, between: nn.Module | None = None, flatten: bool = False):
        super().__init__()
        self.conv, self.bn, self.between, self.flatten = conv, randomise(bn), between or nn.Identity(), flatten

    def forward(self, x):
        y = self.between(self.conv(x))
        return self.bn(y.flatten(1) if self.flatten else y)


FOLDABLE = {
    "conv2d": (lambda: ConvBn(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)), (2, 3, 8, 8)),
    "conv2d_nobias_grouped": (lambda: ConvBn(nn.Conv2d(4, 8, 3, groups=2, bias=False), nn.BatchNorm2d(8)),
                              (1, 4, 6, 6)),
    "conv1d": (lambda: ConvBn(nn.Conv1d(4, 6, 3), nn.BatchNorm1d(6)), (2, 4, 10)),
    "linear": (lambda: ConvBn(nn.Linear(8, 6), nn.BatchNorm1d(6)), (5, 8)),
    "no_affine": (lambda: ConvBn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False)), (1, 3, 4, 4)),
}
AFFINE_ONLY = {  # BN that has no conv/linear of its own in front of it
    "after_relu": (lambda: ConvBn(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()), (2, 3, 8, 8)),
    "after_flatten": (lambda: ConvBn(nn.Conv2d(3, 2, 3), nn.BatchNorm1d(2 * 6 * 6), flatten=True), (2, 3, 8, 8)),
    "linear_rank3": (lambda: ConvBn(nn.Linear(8, 6), nn.BatchNorm1d(5)), (2, 5, 8)),  # BN over dim 1, not features
    "attention_map": (lambda: ConvBn(nn.Softmax(-1), nn.BatchNorm2d(3)), (2, 3, 5, 5)),  # DeepViT re-attention
}


class TwoUsers(nn.Module):
    """The conv output also feeds a residual: folding would change the residual, so BN → affine."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), randomise(nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def _bn_tolerance(ref: torch.Tensor) -> float:
    """fp32 re-association of the folded scale into a conv/linear sum: 1e-5 of the output magnitude."""
    return 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("case", list(FOLDABLE))
def test_fold_batchnorm_folds_into_conv_and_linear(case: str) -> None:
    torch.manual_seed(0)
    build, shape = FOLDABLE[case]
    model, x = build().eval(), torch.randn(shape)
    r = run_pipeline(model, (x,), ["fold_batchnorm"])
    assert r.reports[0].sites == 1 and count(r.program, aten.batch_norm) == 0
    assert count(r.program, aten.mul, aten.add) == 0  # folded, not a separate affine
    assert count(r.program, aten.conv1d, aten.conv2d, aten.linear) == 1
    ref, out = outputs(model, r.model, x)
    assert (out - ref).abs().max().item() <= _bn_tolerance(ref)


@pytest.mark.parametrize("case", list(AFFINE_ONLY) + ["two_users"])
def test_fold_batchnorm_affine_when_not_foldable(case: str) -> None:
    torch.manual_seed(0)
    build, shape = AFFINE_ONLY[case] if case != "two_users" else (TwoUsers, (1, 4, 5, 5))
    model, x = build().eval(), torch.randn(shape)
    r = run_pipeline(model, (x,), ["fold_batchnorm"])
    assert r.reports[0].sites == 1 and count(r.program, aten.batch_norm) == 0
    rank = 2 if case == "after_flatten" else x.dim()  # the BN input's rank
    scales = [n for n in r.program.graph.nodes if is_op(n, aten.mul)]
    assert len(scales) == 1 and tuple(scales[0].args[1].meta["val"].shape) == (1, model.bn.num_features) + (1,) * (rank - 2)
    ref, out = outputs(model, r.model, x)
    # x * scale + shift vs torch's (x - mean) / sqrt(var + eps) * w + b: a few ulp of the output.
    assert (out - ref).abs().max().item() <= _bn_tolerance(ref)


def test_fold_batchnorm_leaves_training_bn_alone() -> None:
    """A train-mode BN (batch statistics) is not a per-channel constant affine: no match."""
    from edgevit.export.passes import PassContext, annotate, get_pass

    x = torch.randn(4, 6)
    gm = torch.export.export(randomise(nn.BatchNorm1d(6)).train(), (x,), strict=False).module()
    annotate(gm, (x,))
    (bn,) = [n for n in gm.graph.nodes if is_op(n, aten.batch_norm)]
    assert bn.args[5] is True
    assert not get_pass("fold_batchnorm")().matches(PassContext(gm, (x,)), bn)


@pytest.mark.slow
def test_fold_batchnorm_reason_coreml(tmp_path: Path) -> None:
    """The Core ML EP (MLProgram) has no BatchNormalization: a BN after an activation, a flatten and on a
    linear's (B, N, C) output each stay in the ONNX graph (the exporter folds only Conv/Gemm + BN)."""

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn_act, self.bn_flat = randomise(nn.BatchNorm2d(4)), randomise(nn.BatchNorm1d(4 * 6 * 6))
            self.fc, self.bn_tokens = nn.Linear(8, 6), randomise(nn.BatchNorm1d(3))

        def forward(self, x):
            y = self.bn_flat(self.bn_act(torch.relu(self.conv(x))).flatten(1))
            return self.bn_tokens(self.fc(y.reshape(1, 3, 48)[..., :8]))

    model, x = Head().eval(), torch.randn(1, 3, 8, 8)
    before = coverage(model, x, [], tmp_path / "without.onnx", "coreml")
    assert before.unsupported == {"BatchNormalization": 3} and before.partitions > 1
    after = coverage(model, x, ["fold_batchnorm"], tmp_path / "with.onnx", "coreml")
    assert after.unsupported == {} and after.whole


# --- decompose_vector_norm ------------------------------------------------------------------------

class VectorNorms(nn.Module):
    """The three spellings that reach ``aten.linalg_vector_norm``: F.normalize, vector_norm, Tensor.norm."""

    def __init__(self, dims, keepdim: bool = False):
        super().__init__()
        self.dims, self.keepdim = dims, keepdim

    def forward(self, x):
        unit = F.normalize(x, p=2.0, dim=-1)
        return unit, torch.linalg.vector_norm(x, dim=self.dims, keepdim=self.keepdim), x.norm()


@pytest.mark.parametrize("shape, dims", [
    ((2, 8, 16), -1), ((2, 5, 3), (0, 2)), ((3, 7), None), ((1, 49, 96), 1),
])
@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_decompose_vector_norm_equivalence(shape, dims, keepdim, scale) -> None:
    torch.manual_seed(0)
    model, x = VectorNorms(dims, keepdim), torch.randn(shape) * scale
    r = run_pipeline(model, (x,), ["decompose_vector_norm"])
    assert r.reports[0].sites == 3 and count(r.program, aten.linalg_vector_norm) == 0
    for ref, out in zip(*outputs(model, r.model, x)):
        assert out.shape == ref.shape
        # Both sides sum n squares (ulp-level errors, different order); sqrt halves the relative error
        # of the sum, mean*N and sqrt add one rounding each: within 4 eps of each norm.
        assert ((out - ref).abs() <= 4 * F32_EPS * ref.abs()).all()


def test_decompose_vector_norm_leaves_other_orders_and_dtypes_alone() -> None:
    class Others(nn.Module):
        def forward(self, x):
            return (torch.linalg.vector_norm(x, ord=1, dim=-1), torch.linalg.vector_norm(x, ord=float("inf")),
                    torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64))

    r = run_pipeline(Others(), (torch.randn(2, 6),), ["decompose_vector_norm"])
    assert r.reports[0].sites == 0 and count(r.program, aten.linalg_vector_norm) == 3


@pytest.mark.slow
@pytest.mark.parametrize("accelerator", ["nnapi", "coreml"])
def test_decompose_vector_norm_reason_ort_eps(tmp_path: Path, accelerator: str) -> None:
    class Cosine(nn.Module):  # cosine-similarity logits, GLNet's slot assignment in miniature
        def forward(self, x):
            x = F.normalize(x, dim=-1)
            return x @ x.transpose(1, 2)

    model, x = Cosine(), torch.randn(1, 16, 32)
    before = coverage(model, x, ["expand_to_broadcast"], tmp_path / "without.onnx", accelerator)
    assert before.unsupported == {"ReduceL2": 1} and not before.whole
    names = ["expand_to_broadcast", "decompose_vector_norm"]
    after = coverage(model, x, names, tmp_path / "with.onnx", accelerator)
    assert after.unsupported == {} and after.whole


# --- sqrt_div_to_rsqrt (export/backends/tflite/passes/rsqrt.py) -----------------------------------

@pytest.mark.parametrize("norm, shape, dims", [
    (nn.LayerNorm(192), (1, 50, 192), [2]),
    (nn.GroupNorm(1, 8), (2, 8, 5, 5), [1, 2, 3]),
])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_sqrt_div_to_rsqrt_equivalence(norm: nn.Module, shape, dims, offset: float) -> None:
    """After the decomposition, each norm's Sqrt + Div is one Rsqrt and a Mul, within the norm's fp32 rounding."""
    torch.manual_seed(0)
    model, x = randomise(norm), torch.randn(shape) * 3 + offset
    decompose = "decompose_layer_norm" if isinstance(norm, nn.LayerNorm) else "decompose_group_norm"
    r = run_pipeline(model, (x,), [decompose, "sqrt_div_to_rsqrt"])
    assert [rep.sites for rep in r.reports] == [1, 1]
    assert count(r.program, aten.sqrt, aten.div) == 0 and count(r.program, aten.rsqrt) == 1
    ref, out = outputs(model, r.model, x)
    assert (out - ref).abs().max().item() <= norm_tolerance(x, dims, ref)


def test_sqrt_div_to_rsqrt_keeps_a_shared_sqrt() -> None:
    """A square root that something else reads stays (rsqrt would add an op, not replace one)."""

    class SharedRoot(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            root = torch.sqrt(x.abs() + 1)
            return x / root + root

    r = run_pipeline(SharedRoot(), (torch.randn(3, 4),), ["sqrt_div_to_rsqrt"])
    assert r.reports[0].sites == 0 and count(r.program, aten.rsqrt) == 0


@pytest.mark.slow
def test_sqrt_div_to_rsqrt_reason_tflite(tmp_path: Path) -> None:
    """The .tflite of a decomposed LayerNorm has SQRT and DIV (both float-only for the NNAPI delegate); after the
    pass one RSQRT instead."""
    from ai_edge_litert.interpreter import Interpreter

    model, x = randomise(nn.LayerNorm(16)), torch.randn(1, 8, 16)

    def ops(names: list[str], path: Path) -> list[str]:
        r = run_pipeline(model, (x,), names)
        get_target("tflite").converter_module().convert(r.program, (x,), path, "fp32")
        return [op["op_name"] for op in Interpreter(str(path))._get_ops_details()]

    before = ops(["decompose_layer_norm"], tmp_path / "a.tflite")
    assert {"SQRT", "DIV"} <= set(before) and "RSQRT" not in before
    after = ops(["decompose_layer_norm", "sqrt_div_to_rsqrt"], tmp_path / "b.tflite")
    assert after.count("RSQRT") == 1 and not {"SQRT", "DIV"} & set(after)
