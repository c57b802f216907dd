"""Tests of the attention passes (export/passes/attention.py, masks.py, softmax.py, broadcast.py):
numerics on tiny modules, and the backend behaviour each pass exists for (converter failures, EP
coverage, fp16 mask constants)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgevit.export.capture import capture
from edgevit.export.passes import run_pipeline
from edgevit.export.passes.attention import _parse_einsum
from edgevit.export.passes.base import aten, is_op

U = 2.0 ** -24  # fp32 unit roundoff
FP16_MIN = float(torch.finfo(torch.float16).min)


class Fn(nn.Module):
    """A module around a function, with optional buffers and parameters."""

    def __init__(self, fn: Callable, **tensors: torch.Tensor):
        super().__init__()
        self.fn = fn
        for name, t in tensors.items():
            if isinstance(t, nn.Parameter):
                self.register_parameter(name, t)
            else:
                self.register_buffer(name, t)

    def forward(self, *xs: torch.Tensor):
        return self.fn(self, *xs)


def _calls(program_or_gm, *ops) -> list[torch.fx.Node]:
    graph = program_or_gm.graph
    return [n for n in graph.nodes if is_op(n, *ops)]


def _sites(result, name: str) -> int:
    return next(r.sites for r in result.reports if r.name == name)


def _run(gm_or_model, *xs):
    with torch.no_grad():
        return gm_or_model(*xs)


def _onnx(program, inputs, path: Path) -> Path:
    from edgevit.export.targets import get_target

    return get_target("onnx").converter_module().convert(program, inputs, path, "fp32")


def _tflite_ops(program, inputs, path: Path) -> list[str]:
    from ai_edge_litert.interpreter import Interpreter

    from edgevit.export.targets import get_target

    get_target("tflite").converter_module().convert(program, inputs, path, "fp32")
    return [op["op_name"] for op in Interpreter(str(path))._get_ops_details()]


def _coreml(program, inputs, path: Path) -> Path:
    from edgevit.export.targets import get_target

    return get_target("coreml").converter_module().convert(program, inputs, path, "fp16")


# --- softmax_last_axis --------------------------------------------------------------------------

def _softmax_bound(ref: torch.Tensor, n: int, log: bool) -> torch.Tensor:
    """Per-element bound on two fp32 softmax evaluations differing in summation order.

    softmax: each result has relative error <= (n + 3)u (n exps summed, exp ~2u, one division).
    log_softmax: absolute error <= u((n + 2) + 2|out| + 2 ln n) (log of the sum, two subtractions).
    The difference of two evaluations is at most twice that.
    """
    ref = ref.double().abs()
    if log:
        return 2 * U * ((n + 2) + 2 * ref + 2 * math.log(n))
    return 2 * (n + 3) * U * ref + 1e-38


SOFTMAX_CASES = [
    ("softmax", (2, 3, 4, 5), 1),
    ("softmax", (1, 64, 7, 7), 1),  # ANE-style softmax over channels
    ("softmax", (3, 5, 7), 0),
    ("softmax", (2, 197, 12), -2),
    ("log_softmax", (2, 9, 6), 1),
    ("log_softmax", (1, 33, 4, 4), -3),
    ("module", (1, 6, 5, 5), 1),  # nn.Softmax(dim=1)
]


@pytest.mark.parametrize("kind,shape,dim", SOFTMAX_CASES)
def test_softmax_last_axis_numerics(kind: str, shape: tuple[int, ...], dim: int) -> None:
    torch.manual_seed(0)
    if kind == "module":
        model = nn.Sequential(nn.Softmax(dim=dim))
    else:
        op = torch.softmax if kind == "softmax" else F.log_softmax
        model = Fn(lambda m, x: op(x * 4.0, dim) + 0.0)
    x = torch.randn(shape)
    r = run_pipeline(model, (x,), ["softmax_last_axis"])
    assert _sites(r, "softmax_last_axis") == 1
    for node in _calls(r.program, aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax):
        rank = node.args[0].meta["val"].dim()
        assert node.args[1] % rank == rank - 1, node.format_node()
    ref, out = _run(model, x), _run(r.model, x)
    n = shape[dim]
    assert ((out.double() - ref.double()).abs() <= _softmax_bound(ref, n, kind == "log_softmax")).all()


def test_softmax_last_axis_leaves_last_axis_alone() -> None:
    model = Fn(lambda m, x: torch.softmax(x, -1) + torch.softmax(x, 2) + torch.softmax(x[0, 0], 0))
    r = run_pipeline(model, (torch.randn(1, 2, 5),), ["softmax_last_axis"])
    assert _sites(r, "softmax_last_axis") == 0


def test_softmax_last_axis_onnx_axis(tmp_path: Path) -> None:
    """ORT's XNNPACK EP takes Softmax only on the last axis: the exported axis moves from 1 to -1."""
    import onnx

    model, x = nn.Sequential(nn.Softmax(dim=1)), torch.randn(1, 3, 4, 5)
    before = onnx.load(_onnx(capture(model, (x,)), (x,), tmp_path / "a.onnx"))
    r = run_pipeline(model, (x,), ["softmax_last_axis"])
    after = onnx.load(_onnx(r.program, (x,), tmp_path / "b.onnx"))

    def axes(m):
        return [a.i for n in m.graph.node if n.op_type == "Softmax" for a in n.attribute if a.name == "axis"]

    assert axes(before) == [1]
    assert [a % 4 for a in axes(after)] == [3]


@pytest.mark.slow
def test_softmax_last_axis_tflite_single_softmax(tmp_path: Path) -> None:
    """TFLite SOFTMAX has no axis: litert-torch lowers softmax(dim=1) to six ops; after the pass it is
    TRANSPOSE, SOFTMAX, TRANSPOSE."""
    model, x = nn.Sequential(nn.Softmax(dim=1)), torch.randn(1, 3, 4, 5)
    before = _tflite_ops(capture(model, (x,)), (x,), tmp_path / "a.tflite")
    assert "SOFTMAX" not in before and {"REDUCE_MAX", "EXP", "SUM", "DIV"} <= set(before)
    r = run_pipeline(model, (x,), ["softmax_last_axis"])
    after = _tflite_ops(r.program, (x,), tmp_path / "b.tflite")
    assert after == ["TRANSPOSE", "SOFTMAX", "TRANSPOSE"]


# --- softmax_drop_unit_dims ---------------------------------------------------------------------

class _ConvQuerySoftmax(nn.Module):
    """MobileViT v2's separable attention scores: a 1-channel slice of a 1x1 conv, soft-maxed over N."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Conv2d(8, 17, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, key, _ = self.qkv(x).split([1, 8, 8], dim=1)
        return key * query.softmax(dim=-1)


@pytest.mark.parametrize("kind", ["softmax", "log_softmax"])
def test_softmax_drop_unit_dims_is_exact(kind: str) -> None:
    """The reshapes are views: the same kernel normalises the same rows, so the outputs are equal bit for bit."""
    torch.manual_seed(0)
    op = torch.softmax if kind == "softmax" else F.log_softmax
    model, x = Fn(lambda m, x: op(x * 3.0, -1) * 1.0), torch.randn(2, 1, 4, 1, 33)
    r = run_pipeline(model, (x,), ["softmax_drop_unit_dims"])
    assert _sites(r, "softmax_drop_unit_dims") == 1
    (node,) = _calls(r.program, aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax)
    assert tuple(node.args[0].meta["val"].shape) == (2, 4, 33)
    assert torch.equal(_run(r.model, x), _run(model, x))


def test_softmax_drop_unit_dims_leaves_other_softmaxes_alone() -> None:
    """No inner unit dim (attention's (B, H, N, N), batch 1 included), not the last axis, or rank 2: no site."""
    model = Fn(lambda m, x, y, z: torch.softmax(x, -1).sum() + torch.softmax(y, 1).sum() + torch.softmax(z, -1).sum())
    inputs = (torch.randn(1, 3, 5, 5), torch.randn(2, 1, 4), torch.randn(1, 7))
    r = run_pipeline(model, inputs, ["softmax_drop_unit_dims"])
    assert _sites(r, "softmax_drop_unit_dims") == 0


@pytest.mark.slow
def test_softmax_drop_unit_dims_keeps_tflite_softmax(tmp_path: Path) -> None:
    """litert-torch's layout pass turns the one-channel transpose after the conv into a reshape and moves the
    softmax axis: six ops instead of SOFTMAX. Without the unit dim the SOFTMAX survives."""
    model, x = _ConvQuerySoftmax().eval(), torch.randn(1, 8, 4, 16)
    before = _tflite_ops(capture(model, (x,)), (x,), tmp_path / "a.tflite")
    assert "SOFTMAX" not in before and {"REDUCE_MAX", "EXP", "SUM", "DIV"} <= set(before)
    r = run_pipeline(model, (x,), ["softmax_drop_unit_dims"])
    after = _tflite_ops(r.program, (x,), tmp_path / "b.tflite")
    assert after.count("SOFTMAX") == 1 and not {"REDUCE_MAX", "EXP", "SUM", "DIV"} & set(after)


# --- finite_masks -------------------------------------------------------------------------------

def _causal_full(m, x):  # HF-style causal mask built in the graph from finfo(fp32).min
    n = x.shape[-1]
    mask = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)
    return torch.softmax(x + mask, -1)


def _masked_fill_inf(m, x):
    return torch.softmax(x.masked_fill(~m.keep, float("-inf")), -1)


def _where_fp16_min(m, x):
    return torch.softmax(torch.where(m.keep, x, torch.finfo(torch.float16).min), -1)


def _hf_extended(m, x):  # (1 - mask) * finfo.min, added to the logits
    ext = (1.0 - m.keep.float()) * torch.finfo(torch.float32).min
    return torch.softmax(x + ext, -1)


def _buffer_inf(m, x):  # a constant additive mask buffer, sliced on the way
    return torch.softmax(x + m.bias[:, : x.shape[-1]], -1)


def _keep(n: int, seed: int) -> torch.Tensor:
    """A random boolean keep-mask with at least one kept position per row (no fully masked rows)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(n, n, generator=g) > 0.5
    keep[torch.arange(n), torch.randint(0, n, (n,), generator=g)] = True
    return keep


FINITE_CASES = [
    ("causal_full", _causal_full, {}, 1),
    ("masked_fill_inf", _masked_fill_inf, {"keep": _keep(6, 1)}, 1),
    ("where_fp16_min", _where_fp16_min, {"keep": _keep(6, 2)}, 1),
    ("hf_extended", _hf_extended, {"keep": _keep(6, 3)}, 1),
    ("buffer_inf", _buffer_inf,
     {"bias": torch.zeros(6, 8).masked_fill(~torch.cat([_keep(6, 4), torch.ones(6, 2, dtype=torch.bool)], 1),
                                            float("-inf"))}, 1),
]


def _sentinels(gm: torch.fx.GraphModule) -> list[str]:
    """Mask sentinels (<= finfo(fp16).min) left in the graph: scalar arguments and buffers."""
    found = [n.format_node() for n in gm.graph.nodes
             if any(isinstance(a, float) and a <= FP16_MIN for a in n.args)]
    used = [gm.get_buffer(n.target) for n in gm.graph.nodes if n.op == "get_attr"
            and isinstance(getattr(gm, str(n.target), None), torch.Tensor)]
    found += [b for b in used if b.is_floating_point() and (b <= FP16_MIN).any()]
    return found


@pytest.mark.parametrize("name,fn,tensors,sites", FINITE_CASES, ids=[c[0] for c in FINITE_CASES])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_finite_masks_exact_on_partially_masked_rows(name, fn, tensors, sites, scale) -> None:
    """Every row keeps at least one position: the outputs are bit-identical in fp32 (masked exps are 0)."""
    torch.manual_seed(0)
    model, x = Fn(fn, **tensors), torch.randn(2, 6, 6) * scale
    r = run_pipeline(model, (x,), ["finite_masks"])
    assert _sites(r, "finite_masks") == sites
    assert _sentinels(r.model) == []
    assert torch.equal(_run(r.model, x), _run(model, x))


def test_finite_masks_leaves_non_softmax_fills_alone() -> None:
    """-inf for a masked max (no softmax downstream) is a real -inf, not an attention mask, and
    log_softmax would turn -inf outputs into finite ones."""
    model = Fn(lambda m, x: x.masked_fill(x < 0, float("-inf")).amax(-1)
               + torch.full((3,), float("-inf")).clamp(min=0)
               + F.log_softmax(x.masked_fill(x < -1, float("-inf")), -1).sum(-1))
    r = run_pipeline(model, (torch.randn(3, 3),), ["finite_masks"])
    assert _sites(r, "finite_masks") == 0


def _fully_masked_model() -> tuple[nn.Module, torch.Tensor]:
    """Row 0 fully masked with finfo(fp32).min, row 1 half masked; logits negative (like q·k scores)."""
    bias = torch.zeros(4, 6)
    bias[0] = torch.finfo(torch.float32).min
    bias[1, 3:] = torch.finfo(torch.float32).min
    model = Fn(lambda m, x: torch.softmax(x + m.bias, -1), bias=bias)
    return model, -torch.rand(1, 4, 6, generator=torch.Generator().manual_seed(0)) * 50 - 20


def test_finite_masks_fp16_fully_masked_row() -> None:
    """In float16 the fp32-min sentinel is -inf: the fully masked row is NaN without the pass and finite
    with it; the other rows are unchanged in fp32. The fully masked row changes in fp32 too (uniform before,
    a softmax of the logits after), beyond fp32 rounding of the model, so the pipeline rolls the pass back
    on this model: parity against PyTorch's fp32 outputs could not pass either."""
    from edgevit.export.passes import PASSES
    from edgevit.export.passes.base import PassContext, annotate

    model, x = _fully_masked_model()
    plain = capture(model, (x,)).module().half()
    assert torch.isnan(_run(plain, x.half())[0, 0]).all()
    gm = capture(model, (x,)).module()
    annotate(gm, (x,))
    assert PASSES["finite_masks"]().run(PassContext(gm, (x,))) == 1  # the pass alone, without the gate
    gm.recompile()
    fixed = _run(copy.deepcopy(gm).half(), x.half())
    assert torch.isfinite(fixed).all()
    assert torch.equal(_run(gm, x)[0, 1:], _run(model, x)[0, 1:])
    report = run_pipeline(model, (x,), ["finite_masks"]).reports[0]
    assert report.status == "rolled back" and "moved by" in report.reason


def _coreml_fp16_constants(package: Path) -> list[np.ndarray]:
    """All fp16 constants (inline and in weight.bin) of a saved ML Program."""
    import coremltools as ct
    from coremltools.libmilstoragepython import _BlobStorageReader

    spec, values = ct.utils.load_spec(str(package)), []
    blob = package / "Data/com.apple.CoreML/weights/weight.bin"
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in block.operations:
                val = op.attributes.get("val")
                if val is None or val.type.tensorType.dataType != 10:  # FLOAT16
                    continue
                if val.HasField("blobFileValue"):
                    raw = _BlobStorageReader(str(blob)).read_fp16_data(val.blobFileValue.offset)
                    values.append(np.asarray(raw, dtype=np.uint16).view(np.float16))
                else:
                    values.append(np.frombuffer(val.immediateValue.tensor.bytes.values, dtype=np.float16))
    return values


@pytest.mark.slow
@pytest.mark.parametrize("which", ["buffer", "masked_fill"])
def test_finite_masks_coreml_fp16_constant(tmp_path: Path, which: str) -> None:
    """coremltools 9.0 stores the mask sentinel as fp16 -inf (PR #2669's bug); after the pass it is -1e4."""
    if which == "buffer":  # rows partly masked only: a fully masked row rolls the pass back (test above)
        model, x = _fully_masked_model()
        model.bias[0] = 0.0
    else:
        model = Fn(lambda m, x: torch.softmax(x.masked_fill(x < -60, float("-inf")), -1))
        x = -torch.rand(1, 4, 6) * 50 - 20
    before = _coreml_fp16_constants(_coreml(capture(model, (x,)), (x,), tmp_path / "a.mlpackage"))
    assert any(np.isneginf(v).any() for v in before)
    r = run_pipeline(model, (x,), ["finite_masks"])
    after = _coreml_fp16_constants(_coreml(r.program, (x,), tmp_path / "b.mlpackage"))
    assert not any(np.isinf(v).any() for v in after)
    assert any((v == np.float16(-1e4)).any() for v in after)


# --- expand_to_broadcast ------------------------------------------------------------------------

EXPAND_CASES = [
    # name, fn, input shape, tensors, sites
    ("gate_expand", lambda m, x: x * torch.sigmoid(x.mean(-1, keepdim=True)).expand(-1, -1, x.shape[-1]),
     (2, 5, 8), {}, 1),
    ("expand_as_add", lambda m, x: x + x.mean(1, keepdim=True).expand_as(x), (2, 5, 8), {}, 1),
    ("lower_rank_param", lambda m, x: x * m.w.expand(x.shape[0], x.shape[1], -1), (2, 5, 8),
     {"w": nn.Parameter(torch.randn(8))}, 1),
    ("repeat_size1", lambda m, x: x - x.amax(-1, keepdim=True).repeat(1, 1, x.shape[-1]), (1, 5, 8), {}, 1),
    ("repeat_new_dims", lambda m, x: x / (m.s.abs() + 1).repeat(2, 5, 1), (2, 5, 8), {"s": torch.randn(8)}, 1),
    ("where_branch", lambda m, x: torch.where(x > 0, x.mean(1, keepdim=True).expand(2, 5, 8), x), (2, 5, 8), {}, 1),
    ("two_users", lambda m, x: (lambda e: x * e + torch.maximum(x, e))(x.mean(1, keepdim=True).expand(2, 5, 8)),
     (2, 5, 8), {}, 1),
    ("cls_token_batch1", lambda m, x: torch.cat([m.cls.expand(x.shape[0], -1, -1), x], 1), (1, 5, 8),
     {"cls": nn.Parameter(torch.randn(1, 1, 8))}, 1),
    ("insert_ones", lambda m, x: torch.cat([x.mean((0, 1)).expand(1, 1, 8), x], 1), (1, 5, 8), {}, 1),
    # left alone: the expand decides the output shape, materialises a tile, or feeds a non-broadcasting op
    ("shape_from_expand", lambda m, x: x[:, :1] * x[:, :1].sum(-1, keepdim=True).expand(2, 5, 8), (2, 5, 8), {}, 0),
    ("tiling_repeat", lambda m, x: x.repeat(1, 2, 1) * 2.0, (2, 5, 8), {}, 0),
    ("cls_token_batch2", lambda m, x: torch.cat([m.cls.expand(x.shape[0], -1, -1), x], 1), (2, 5, 8),
     {"cls": nn.Parameter(torch.randn(1, 1, 8))}, 0),
    # one expand goes; the other stays so that an operand still covers the output
    ("mutual_broadcast",
     lambda m, x: x.mean(-1, keepdim=True).expand(2, 5, 8) * x.mean(1, keepdim=True).expand(2, 5, 8), (2, 5, 8), {}, 1),
    ("expand_into_matmul", lambda m, x: x.mean(1, keepdim=True).expand(2, 5, 8) @ x.transpose(1, 2), (2, 5, 8), {}, 0),
]


@pytest.mark.parametrize("name,fn,shape,tensors,sites", EXPAND_CASES, ids=[c[0] for c in EXPAND_CASES])
def test_expand_to_broadcast_exact(name, fn, shape, tensors, sites) -> None:
    torch.manual_seed(0)
    model, x = Fn(fn, **tensors), torch.randn(shape)
    r = run_pipeline(model, (x,), ["expand_to_broadcast"])
    assert _sites(r, "expand_to_broadcast") == sites
    before = len(_calls(capture(model, (x,)), aten.expand, aten.expand_as, aten.repeat))
    assert len(_calls(r.program, aten.expand, aten.expand_as, aten.repeat)) == before - sites
    if sites:  # same-rank broadcasting: every operand of the element-wise users has the output's rank
        for node in r.model.graph.nodes:
            if is_op(node, aten.mul, aten.add, aten.sub, aten.div, aten.where, aten.maximum):
                ranks = {a.meta["val"].dim() for a in node.args if isinstance(a, torch.fx.Node)}
                assert len(ranks) == 1, node.format_node()
    assert torch.equal(_run(r.model, x), _run(model, x))


@pytest.mark.parametrize("ep", ["nnapi", "coreml"])
def test_expand_to_broadcast_onnx_ep_coverage(tmp_path: Path, ep: str) -> None:
    """ONNX Expand is in neither the NNAPI nor the Core ML EP list: it splits the graph; after the pass
    the graph is one partition."""
    from edgevit.export.backends.onnx.coverage import onnx_ep_coverage

    model = Fn(lambda m, x: x * x.mean(-1, keepdim=True).expand_as(x) + m.b.expand(1, 5, 8), b=torch.randn(8))
    x = torch.randn(1, 5, 8)
    before = onnx_ep_coverage(_onnx(capture(model, (x,)), (x,), tmp_path / "a.onnx"), ep)
    assert before.unsupported.get("Expand") and not before.whole
    r = run_pipeline(model, (x,), ["expand_to_broadcast"])
    after = onnx_ep_coverage(_onnx(r.program, (x,), tmp_path / "b.onnx"), ep)
    assert "Expand" not in after.unsupported and after.whole


# --- einsum_to_matmul ---------------------------------------------------------------------------

EINSUM_CASES = [
    # equation, operand shapes
    ("bhqd,bhkd->bhqk", [(1, 2, 5, 4), (1, 2, 7, 4)]),
    ("bhqk,bhkd->bhqd", [(2, 3, 5, 7), (2, 3, 7, 4)]),
    ("bchq,bkhc->bkhq", [(1, 8, 2, 5), (1, 5, 2, 8)]),  # ANE reference attention
    ("bkhq,bchk->bchq", [(1, 5, 2, 5), (1, 8, 2, 5)]),
    ("ij,jk", [(3, 4), (4, 5)]),  # implicit output
    ("...qd,...kd->...qk", [(1, 2, 3, 4), (1, 2, 5, 4)]),
    ("...qd,kd", [(2, 3, 4), (5, 4)]),  # ellipsis + implicit output
    ("bij,bjk->bik", [(1, 3, 4), (2, 4, 5)]),  # size-1 batch label broadcasts
    ("bijk,bkjl->bil", [(2, 3, 4, 5), (2, 5, 4, 6)]),  # two contracted labels
    ("abc,cd->abd", [(2, 3, 4), (4, 5)]),
    ("bnc,bmc->bnm", [(1, 6, 8), (1, 6, 8)]),
    ("bhwc,hkc->bhwk", [(1, 3, 5, 4), (3, 6, 4)]),  # relative-position style
    ("bnc,c->bn", [(2, 5, 8), (8,)]),
    ("i,i->", [(7,), (7,)]),  # dot product
    ("i,j->ij", [(3,), (4,)]),  # outer product: one broadcasting mul
    ("bn,bn->bn", [(2, 5), (2, 5)]),  # element-wise
    ("bnc,bmd->bnd", [(2, 3, 4), (2, 5, 6)]),  # private labels summed first
    ("bnc->bc", [(2, 5, 8)]),
    ("bhnd->bnhd", [(1, 2, 3, 4)]),
    ("ij->", [(3, 4)]),
]


@pytest.mark.parametrize("equation,shapes", EINSUM_CASES, ids=[c[0] for c in EINSUM_CASES])
def test_einsum_to_matmul_numerics(equation: str, shapes: list[tuple[int, ...]]) -> None:
    torch.manual_seed(0)
    xs = tuple(torch.randn(s) for s in shapes)
    model = Fn(lambda m, *ops: torch.einsum(equation, *ops))
    r = run_pipeline(model, xs, ["einsum_to_matmul"])
    assert _sites(r, "einsum_to_matmul") == 1
    assert not _calls(r.program, aten.einsum)
    ref, out = _run(model, *xs), _run(r.model, *xs)
    assert out.shape == ref.shape
    # dot products of length K (product of the summed labels): |Δ| <= 2·K·u·Σ|a·b|
    labels, out_labels = _parse_einsum(equation, [len(s) for s in shapes])
    size: dict[str, int] = {}
    for lab, shape in zip(labels, shapes):
        for c, n in zip(lab, shape):
            size[c] = max(size.get(c, 1), n)
    k = math.prod(n for c, n in size.items() if c not in out_labels)
    magnitude = torch.einsum(equation, *(x.double().abs() for x in xs))
    assert ((out.double() - ref.double()).abs() <= 2 * k * U * magnitude + 1e-30).all()


@pytest.mark.parametrize("equation,shapes", [
    ("ii->i", [(4, 4)]),  # diagonal
    ("bii,bi->b", [(2, 3, 3), (2, 3)]),  # trace-like
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)]),  # three operands
])
def test_einsum_to_matmul_leaves_unsupported_alone(equation: str, shapes: list[tuple[int, ...]]) -> None:
    xs = tuple(torch.randn(s) for s in shapes)
    r = run_pipeline(Fn(lambda m, *ops: torch.einsum(equation, *ops)), xs, ["einsum_to_matmul"])
    assert _sites(r, "einsum_to_matmul") == 0


@pytest.mark.slow
@pytest.mark.parametrize("equation,shapes,error", [
    ("ij,jk", [(3, 4), (4, 5)], "unsupported einsum equation"),
    ("...qd,...kd->...qk", [(1, 2, 3, 4), (1, 2, 5, 4)], "perm should have the same length"),
    ("bij,bjk->bik", [(1, 3, 4), (2, 4, 5)], "Invalid target shape"),
])
def test_einsum_to_matmul_coreml_converts(tmp_path: Path, equation: str, shapes, error: str) -> None:
    """coremltools 9.0 fails on these equations (coremltools issues #1359, #1537, #2644); the matmul form converts."""
    xs = tuple(torch.randn(s) for s in shapes)
    model = Fn(lambda m, *ops: torch.einsum(equation, *ops))
    with pytest.raises(Exception, match=error):
        _coreml(capture(model, xs), xs, tmp_path / "a.mlpackage")
    r = run_pipeline(model, xs, ["einsum_to_matmul"])
    assert _coreml(r.program, xs, tmp_path / "b.mlpackage").exists()


@pytest.mark.parametrize("ep", ["nnapi", "coreml"])
def test_einsum_to_matmul_onnx_ep_coverage(tmp_path: Path, ep: str) -> None:
    from edgevit.export.backends.onnx.coverage import onnx_ep_coverage

    q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 7, 4)
    model = Fn(lambda m, a, b: torch.einsum("bhqd,bhkd->bhqk", a, b).softmax(-1))
    before = onnx_ep_coverage(_onnx(capture(model, (q, k)), (q, k), tmp_path / "a.onnx"), ep)
    assert before.unsupported.get("Einsum") and not before.whole
    r = run_pipeline(model, (q, k), ["einsum_to_matmul"])
    after = onnx_ep_coverage(_onnx(r.program, (q, k), tmp_path / "b.onnx"), ep)
    assert "Einsum" not in after.unsupported and after.whole


# --- sdpa_to_explicit ---------------------------------------------------------------------------

def _attention_bound(q, k, v, mask, scale) -> torch.Tensor:
    """First-order fp32 bound between two evaluations of softmax(q·kᵀ·s + mask)·v, doubled.

    logits: |Δl| <= 2(D+2)u·s·(|q|·|k|ᵀ); softmax: relative 2·max_row|Δl| + 2(S+3)u;
    output: that times Σ p|v| plus 2(S+1)u·Σ p|v|. The factor 2 covers exp's ulp error and
    second-order terms.
    """
    q, k, v = q.double(), k.double(), v.double()
    d, s = q.shape[-1], k.shape[-2]
    dl = 2 * (d + 2) * U * scale * (q.abs() @ k.abs().transpose(-2, -1))
    logits = scale * q @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits + (torch.where(mask, 0.0, -math.inf) if mask.dtype == torch.bool else mask.double())
    p = torch.softmax(logits, -1).nan_to_num(0.0)
    rel = 2 * dl.amax(-1, keepdim=True) + 2 * (s + 3) * U + 2 * (s + 1) * U
    return 2 * rel * (p @ v.abs()) + 1e-30


def _rowmask(shape: tuple[int, ...], seed: int, full_row: int | None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) > 0.4
    mask[..., :, 0] = True
    if full_row is not None:
        mask[..., full_row, :] = False
    return mask


SDPA_CASES = [
    # name, q/k/v shapes, mask kind, extra kwargs
    ("plain", (2, 3, 5, 8), (2, 3, 7, 8), None, {}),
    ("scale", (1, 2, 5, 4), (1, 2, 5, 4), None, {"scale": 0.3}),
    ("rank3", (4, 6, 8), (4, 9, 8), None, {}),
    ("causal", (1, 2, 6, 4), (1, 2, 6, 4), None, {"is_causal": True}),
    ("bool_const", (1, 2, 5, 4), (1, 2, 7, 4), "bool", {}),
    ("bool_const_full_row", (1, 2, 5, 4), (1, 2, 7, 4), "bool_full", {}),
    ("float_const_inf_row", (1, 2, 5, 4), (1, 2, 7, 4), "float_full", {}),
    ("bool_runtime_full_row", (1, 2, 5, 4), (1, 2, 7, 4), "runtime", {}),
]


@pytest.mark.parametrize("name,qs,ks,mask_kind,kwargs", SDPA_CASES, ids=[c[0] for c in SDPA_CASES])
def test_sdpa_to_explicit_numerics(name, qs, ks, mask_kind, kwargs) -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(qs) * 2, torch.randn(ks) * 2, torch.randn(ks)
    mask, tensors = None, {}
    if mask_kind in ("bool", "bool_full"):
        mask = _rowmask((qs[-2], ks[-2]), 1, 2 if mask_kind == "bool_full" else None)
        tensors["mask"] = mask
    elif mask_kind == "float_full":
        mask = torch.randn(qs[-2], ks[-2]).masked_fill(~_rowmask((qs[-2], ks[-2]), 2, 3), -math.inf)
        tensors["mask"] = mask
    if mask_kind == "runtime":  # a bool mask computed from an input: row 1 of every head is empty
        mask = _rowmask(qs[:-2] + (qs[-2], ks[-2]), 3, 1)

        def fn(m, q, k, v, keep):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep > 0.5)
        model, inputs = Fn(fn), (q, k, v, mask.float())
    else:
        def fn(m, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=getattr(m, "mask", None), **kwargs)
        model, inputs = Fn(fn, **tensors), (q, k, v)
    r = run_pipeline(model, inputs, ["sdpa_to_explicit"])
    assert _sites(r, "sdpa_to_explicit") == 1
    assert not _calls(r.program, aten.scaled_dot_product_attention, aten._safe_softmax)
    ref, out = _run(model, *inputs), _run(r.model, *inputs)
    if kwargs.get("is_causal"):
        mask = torch.ones(qs[-2], ks[-2], dtype=torch.bool).tril()
    scale = kwargs.get("scale", 1 / math.sqrt(qs[-1]))
    assert torch.isfinite(out).all()
    assert ((out.double() - ref.double()).abs() <= _attention_bound(q, k, v, mask, scale)).all()


def test_sdpa_to_explicit_multihead_attention() -> None:
    """nn.MultiheadAttention(batch_first=True) in eval with need_weights=False captures as SDPA
    (a key_padding_mask arrives as an in-graph float -inf mask); need_weights=True is bmm + softmax."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    padding = torch.zeros(1, 6, dtype=torch.bool)
    padding[0, 4:] = True
    model = Fn(lambda m, x: m.mha(x, x, x, need_weights=False, key_padding_mask=m.pad)[0], pad=padding)
    model.mha = mha
    x = torch.randn(1, 6, 16)
    r = run_pipeline(model, (x,), ["sdpa_to_explicit"])
    assert _sites(r, "sdpa_to_explicit") == 1
    assert not _calls(r.program, aten.scaled_dot_product_attention)
    # bound: the attention core's (on the float64 projections), through out_proj, plus out_proj's own
    # rounding on both sides (2·(C+1)·u·|W|·|a|)
    with torch.no_grad():
        w, b = mha.in_proj_weight.double(), mha.in_proj_bias.double()
        q, k, v = (x.double() @ w[i * 16:(i + 1) * 16].T + b[i * 16:(i + 1) * 16] for i in range(3))
        q, k, v = (t.view(1, 6, 4, 4).transpose(1, 2) for t in (q, k, v))
        mask = torch.zeros(1, 1, 1, 6, dtype=torch.float64).masked_fill(padding.view(1, 1, 1, 6), -math.inf)
        core = _attention_bound(q, k, v, mask, 0.5).transpose(1, 2).reshape(1, 6, 16)
        attn = torch.softmax(q @ k.transpose(-2, -1) * 0.5 + mask, -1) @ v
        attn = attn.transpose(1, 2).reshape(1, 6, 16)
        w_out = mha.out_proj.weight.double().abs()
        bound = core @ w_out.T + 2 * 17 * U * (attn.abs() @ w_out.T + mha.out_proj.bias.double().abs())
    assert ((_run(r.model, x).double() - _run(model, x).double()).abs() <= bound).all()
    plain = Fn(lambda m, x: m.mha(x, x, x)[0])
    plain.mha = mha
    assert _sites(run_pipeline(plain, (x,), ["sdpa_to_explicit"]), "sdpa_to_explicit") == 0


def test_sdpa_to_explicit_leaves_runtime_float_mask_and_dropout() -> None:
    q = torch.randn(1, 2, 5, 4)
    runtime_float = Fn(lambda m, q: F.scaled_dot_product_attention(q, q, q, attn_mask=q.sum(-1, keepdim=True)))
    assert _sites(run_pipeline(runtime_float, (q,), ["sdpa_to_explicit"]), "sdpa_to_explicit") == 0
    dropout = Fn(lambda m, q: F.scaled_dot_product_attention(q, q, q, dropout_p=0.5))
    graph = capture(dropout, (q,)).module()
    assert _calls(graph, aten.scaled_dot_product_attention)  # the capture keeps a random dropout
    assert _sites(run_pipeline(dropout, (q,), ["sdpa_to_explicit"]), "sdpa_to_explicit") == 0


@pytest.mark.parametrize("ep", ["nnapi", "coreml"])
def test_sdpa_to_explicit_onnx_ep_coverage(tmp_path: Path, ep: str) -> None:
    """The ONNX exporter lowers a boolean-masked SDPA with IsNaN + Where (its safe softmax): not in the
    NNAPI / Core ML EP lists, two partitions. The explicit form is one partition."""
    from edgevit.export.backends.onnx.coverage import onnx_ep_coverage

    model = Fn(lambda m, q: F.scaled_dot_product_attention(q, q, q, attn_mask=m.mask),
               mask=_rowmask((5, 5), 0, None))
    q = torch.randn(1, 2, 5, 4)
    before = onnx_ep_coverage(_onnx(capture(model, (q,)), (q,), tmp_path / "a.onnx"), ep)
    assert before.unsupported.get("IsNaN") and not before.whole
    r = run_pipeline(model, (q,), ["sdpa_to_explicit"])
    after = onnx_ep_coverage(_onnx(r.program, (q,), tmp_path / "b.onnx"), ep)
    assert after.unsupported == {} and after.whole


@pytest.mark.slow
def test_sdpa_to_explicit_tflite_causal_without_select(tmp_path: Path) -> None:
    """litert-torch builds is_causal with SELECT_V2 at run time; the explicit form adds a constant."""
    model = Fn(lambda m, q: F.scaled_dot_product_attention(q, q, q, is_causal=True))
    q = torch.randn(1, 2, 6, 4)
    assert "SELECT_V2" in _tflite_ops(capture(model, (q,)), (q,), tmp_path / "a.tflite")
    r = run_pipeline(model, (q,), ["sdpa_to_explicit"])
    after = _tflite_ops(r.program, (q,), tmp_path / "b.tflite")
    assert "SELECT_V2" not in after and after.count("SOFTMAX") == 1
