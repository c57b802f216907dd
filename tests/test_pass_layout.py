"""The layout passes (export/passes/layout.py, rank.py): unfold_fold_static, pixel_unshuffle_rank4, lower_rank.

Each pass: numerical equivalence on tiny modules with the pattern (exact data movement → torch.equal)
and the backend reason on a real converter (failure or rank > 4 without the pass, none with it).
"""

from __future__ import annotations

import collections
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgevit.export.capture import capture
from edgevit.export.passes import PassContext, annotate, run_pipeline
from edgevit.export.passes.rank import LowerRank, plan_low_rank, replay
from edgevit.export.targets import get_target

aten = torch.ops.aten
FP32_UNIT = 2.0**-24  # unit roundoff of fp32


# --- helpers ------------------------------------------------------------------------------------------

def ops_in(program: torch.export.ExportedProgram) -> set:
    return {n.target for n in program.graph.nodes if n.op == "call_function"}


def has_op(program: torch.export.ExportedProgram, packet) -> bool:
    return any(getattr(t, "overloadpacket", None) is packet for t in ops_in(program))


def graph_max_rank(program: torch.export.ExportedProgram) -> int:
    ranks = [n.meta["val"].dim() for n in program.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    return max(ranks)


def convert(target: str, program: torch.export.ExportedProgram, inputs: tuple, path: Path) -> Path:
    return get_target(target).converter_module().convert(program, inputs, path, "fp32")


def tflite_max_rank(path: Path) -> int:
    from ai_edge_litert.interpreter import Interpreter

    return max(len(t["shape"]) for t in Interpreter(str(path)).get_tensor_details())


def tflite_run(path: Path, x: torch.Tensor) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(str(path))
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x.numpy())
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def onnx_ops(path: Path) -> collections.Counter:
    import onnx

    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def check_equal(model: nn.Module, rewritten: nn.Module, shape: tuple[int, ...], seed: int = 1) -> None:
    """Data-movement rewrites are exact: same outputs bit for bit on a fresh input."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert torch.equal(model(x), rewritten(x))


# --- unfold_fold_static ---------------------------------------------------------------------------------

class Unfold(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.kw = kw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.unfold(x, **self.kw)


class Fold(nn.Module):
    def __init__(self, size: tuple[int, int], **kw) -> None:
        super().__init__()
        self.size, self.kw = size, kw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.fold(x, self.size, **self.kw)


class MobileViTv2Patches(nn.Module):
    """MobileViT-v2's unfold → per-patch mixing → fold (non-overlapping patches)."""

    def __init__(self, channels: int = 4, patch: int = 2) -> None:
        super().__init__()
        self.patch = patch
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        b, c = x.shape[:2]
        cols = F.unfold(x, self.patch, stride=self.patch)  # (B, C*P, N)
        cols = cols.reshape(b, c, self.patch * self.patch, -1)
        cols = self.mix(cols).reshape(b, -1, cols.shape[-1])
        return F.fold(cols, size, self.patch, stride=self.patch)


# (kwargs, input shape, op expected in place of im2col)
UNFOLDS = [
    ({"kernel_size": 2, "stride": 2}, (2, 3, 8, 8), aten.pixel_unshuffle),
    ({"kernel_size": 4, "stride": 4}, (1, 5, 8, 12), aten.pixel_unshuffle),
    ({"kernel_size": 2, "stride": 2}, (3, 8, 8), aten.pixel_unshuffle),  # unbatched
    ({"kernel_size": 3, "stride": 1, "padding": 1}, (2, 3, 8, 8), aten.conv2d),
    ({"kernel_size": (2, 3), "stride": (2, 3)}, (1, 3, 8, 9), aten.conv2d),  # not square: no pixel_unshuffle
    ({"kernel_size": 3, "stride": 2, "dilation": 2, "padding": 1}, (1, 4, 9, 10), aten.conv2d),
    ({"kernel_size": 2, "stride": 2}, (1, 3, 9, 8), aten.conv2d),  # patches do not tile the image
]


@pytest.mark.parametrize("kw,shape,op", UNFOLDS)
def test_unfold_fold_static_unfold_is_exact(kw, shape, op) -> None:
    model = Unfold(**kw)
    r = run_pipeline(model, (torch.randn(shape),), ["unfold_fold_static"])
    assert r.reports[0].sites == 1
    assert not has_op(r.program, aten.im2col)
    assert has_op(r.program, op)
    check_equal(model, r.model, shape)


# (output size, kwargs, batch, op expected in place of col2im, overlapping patches)
FOLDS = [
    ((8, 8), {"kernel_size": 2, "stride": 2}, 2, aten.pixel_shuffle, False),
    ((8, 12), {"kernel_size": 4, "stride": 4}, 1, aten.pixel_shuffle, False),
    ((8, 8), {"kernel_size": 2, "stride": 2}, None, aten.pixel_shuffle, False),  # unbatched
    ((8, 9), {"kernel_size": (2, 3), "stride": (2, 3)}, 1, aten.conv_transpose2d, False),
    ((9, 8), {"kernel_size": 2, "stride": 2}, 2, aten.conv_transpose2d, False),  # last row: no patch
    ((8, 8), {"kernel_size": 3, "stride": 1, "padding": 1}, 2, aten.conv2d, True),
    ((7, 9), {"kernel_size": (3, 2), "stride": 1, "dilation": (1, 2)}, 1, aten.conv2d, True),
    ((10, 11), {"kernel_size": 3, "stride": 2}, 1, aten.conv_transpose2d, True),
    ((9, 10), {"kernel_size": 3, "stride": 2, "dilation": 2, "padding": 1}, 2, aten.conv_transpose2d, True),
]


@pytest.mark.parametrize("size,kw,batch,op,overlap", FOLDS)
def test_unfold_fold_static_fold_matches_col2im(size, kw, batch, op, overlap) -> None:
    channels = 3
    image = torch.randn((batch, channels, *size) if batch else (channels, *size))
    cols = F.unfold(image, **kw)
    model = Fold(size, **kw)
    r = run_pipeline(model, (cols,), ["unfold_fold_static"])
    assert r.reports[0].sites == 1
    assert not has_op(r.program, aten.col2im)
    assert has_op(r.program, op)
    fresh = torch.randn(cols.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = model(fresh), r.model(fresh)
    if not overlap:
        assert torch.equal(want, got)  # each pixel receives exactly one value
        return
    # Overlaps are summed in another order: each pixel sums at most kh*kw terms, so the fp32
    # re-association error is below (kh*kw - 1) * u * sum(|terms|).
    kh, kw_ = (kw["kernel_size"],) * 2 if isinstance(kw["kernel_size"], int) else kw["kernel_size"]
    bound = (kh * kw_ - 1) * FP32_UNIT * model(fresh.abs())
    assert torch.all((want - got).abs() <= bound)


def test_unfold_fold_static_mobilevit_v2_block_is_exact() -> None:
    model = MobileViTv2Patches().eval()
    r = run_pipeline(model, (torch.randn(1, 4, 8, 8),), ["unfold_fold_static"])
    assert r.reports[0].sites == 2
    assert not (has_op(r.program, aten.im2col) or has_op(r.program, aten.col2im))
    check_equal(model, r.model, (1, 4, 8, 8))


@pytest.mark.slow
def test_unfold_fold_static_fold_loads_in_litert_only_with_pass(tmp_path: Path) -> None:
    """litert-torch writes F.fold as STABLEHLO_SCATTER, which the interpreter cannot allocate."""
    model, x = Fold((8, 8), kernel_size=2, stride=2), F.unfold(torch.randn(1, 4, 8, 8), 2, stride=2)
    before = convert("tflite", capture(model, (x,)), (x,), tmp_path / "before.tflite")
    with pytest.raises(RuntimeError, match="stablehlo.scatter"):
        tflite_run(before, x)
    r = run_pipeline(model, (x,), ["unfold_fold_static"])
    after = convert("tflite", r.program, (x,), tmp_path / "after.tflite")
    np.testing.assert_array_equal(tflite_run(after, x), model(x).numpy())


@pytest.mark.slow
def test_unfold_fold_static_overlapping_fold_converts_to_coreml_only_with_pass(tmp_path: Path) -> None:
    model = Fold((8, 8), kernel_size=3, padding=1)
    x = F.unfold(torch.randn(1, 2, 8, 8), 3, padding=1)
    with pytest.raises(ValueError, match="stride >= kernel_size for col2im"):
        convert("coreml", capture(model, (x,)), (x,), tmp_path / "before.mlpackage")
    r = run_pipeline(model, (x,), ["unfold_fold_static"])
    assert convert("coreml", r.program, (x,), tmp_path / "after.mlpackage").exists()


@pytest.mark.slow
@pytest.mark.parametrize("accelerator", ["nnapi", "coreml"])
def test_unfold_fold_static_onnx_mobile_eps_cover_the_block_only_with_pass(tmp_path: Path, accelerator) -> None:
    """ONNX: Col2Im is in neither EP; unfold exports as Gather + rank-6 Reshape/Transpose."""
    from edgevit.export.backends.onnx.coverage import onnx_ep_coverage

    model, x = MobileViTv2Patches().eval(), torch.randn(1, 4, 8, 8)
    before = convert("onnx", capture(model, (x,)), (x,), tmp_path / "before.onnx")
    cov = onnx_ep_coverage(before, accelerator)
    assert "Col2Im" in cov.unsupported and not cov.whole
    r = run_pipeline(model, (x,), ["unfold_fold_static", "pixel_unshuffle_rank4"])
    after = convert("onnx", r.program, (x,), tmp_path / "after.onnx")
    cov = onnx_ep_coverage(after, accelerator)
    assert cov.whole and not cov.unsupported and not cov.problems, cov.to_dict()
    assert not {"Col2Im", "Gather"} & set(onnx_ops(after))


# --- pixel_unshuffle_rank4 ----------------------------------------------------------------------------

class PixelUnshuffle(nn.Module):
    def __init__(self, r: int) -> None:
        super().__init__()
        self.r = r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(x, self.r) * 2


class PixelShuffle(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(x, 2) * 2


@pytest.mark.parametrize("shape,r", [((1, 3, 8, 8), 2), ((2, 4, 12, 6), 3), ((3, 8, 4), 2), ((2, 1, 16, 8), 4)])
def test_pixel_unshuffle_rank4_is_exact(shape, r) -> None:
    model = PixelUnshuffle(r)
    p = run_pipeline(model, (torch.randn(shape),), ["pixel_unshuffle_rank4"])
    assert p.reports[0].sites == 1
    assert not has_op(p.program, aten.pixel_unshuffle)
    assert graph_max_rank(p.program) <= 4
    check_equal(model, p.model, shape)


@pytest.mark.slow
def test_pixel_unshuffle_rank4_onnx_coreml_ep_rank_problem_gone(tmp_path: Path) -> None:
    """The ONNX exporter lowers pixel_unshuffle through rank-6 Reshape/Transpose."""
    from edgevit.export.backends.onnx.coverage import onnx_ep_coverage

    model, x = PixelUnshuffle(2), torch.randn(1, 4, 8, 8)
    before = onnx_ep_coverage(convert("onnx", capture(model, (x,)), (x,), tmp_path / "before.onnx"), "coreml")
    assert any("rank" in p for p in before.problems), before.problems  # "rank>5: ai.onnx:Reshape"
    r = run_pipeline(model, (x,), ["pixel_unshuffle_rank4"])
    after = onnx_ep_coverage(convert("onnx", r.program, (x,), tmp_path / "after.onnx"), "coreml")
    assert not after.problems and after.whole


@pytest.mark.slow
def test_pixel_shuffle_needs_no_rank_pass(tmp_path: Path) -> None:
    """Why there is no pixel_shuffle_rank4: ONNX has DepthToSpace, litert-torch lowers it at rank 4."""
    model, x = PixelShuffle(), torch.randn(2, 16, 4, 4)
    program = capture(model, (x,))
    assert onnx_ops(convert("onnx", program, (x,), tmp_path / "m.onnx"))["DepthToSpace"] == 1
    assert tflite_max_rank(convert("tflite", program, (x,), tmp_path / "m.tflite")) <= 4


# --- lower_rank ---------------------------------------------------------------------------------------

class TimmAttention(nn.Module):
    """timm ``Attention`` (fused QKV at rank 5), with q/k/v by ``unbind(0)`` or by indexing."""

    def __init__(self, dim: int = 16, heads: int = 2, index: bool = False) -> None:
        super().__init__()
        self.heads, self.index = heads, index
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = (qkv[0], qkv[1], qkv[2]) if self.index else qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1) * 0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class SplitQKV(nn.Module):
    """Rank-5 QKV read through ``split`` / ``chunk`` + ``squeeze``."""

    def __init__(self, dim: int = 12, heads: int = 3, chunk: bool = False) -> None:
        super().__init__()
        self.heads, self.chunk = heads, chunk
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads)
        parts = qkv.chunk(3, dim=2) if self.chunk else qkv.split(1, dim=2)
        q, k, v = (p.squeeze(2).transpose(1, 2) for p in parts)
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


class WindowPartition(nn.Module):
    """Swin window partition → per-window op → window reverse, both at rank 6."""

    def __init__(self, ws: int = 2, transpose: bool = False) -> None:
        super().__init__()
        self.ws, self.transpose = ws, transpose

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        b, h, w, c = x.shape
        ws = self.ws
        y = x.view(b, h // ws, ws, w // ws, ws, c)
        y = y.transpose(2, 3) if self.transpose else y.permute(0, 1, 3, 2, 4, 5)  # EfficientViT / Swin
        windows = y.reshape(-1, ws, ws, c) * 2
        z = windows.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        return z


class WindowQKV(nn.Module):
    """Windows and heads in one rank-6 QKV: q/k/v stay rank 5 (Core ML's limit)."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, windows, N, C)
        b, nw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, nw, n, 3, self.heads, c // self.heads).permute(3, 0, 1, 4, 2, 5).unbind(0)
        return (q * k + v).sum(2)


class Patchify(nn.Module):
    """einops ``rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)')`` written at rank 6, and back."""

    def __init__(self, p: int = 2) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.p
        tokens = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)
        tokens = tokens * 3
        back = tokens.view(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        return back


class MobileViTUnfold(nn.Module):
    """MobileViT-v1 unfold/fold in the lucidrains form: 'b d (h ph) (w pw) -> b (ph pw) (h w) d' and back."""

    def __init__(self, ph: int = 2, pw: int = 2) -> None:
        super().__init__()
        self.ph, self.pw = ph, pw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w = x.shape
        ph, pw = self.ph, self.pw
        nh, nw = h // ph, w // pw
        y = x.view(b, d, nh, ph, nw, pw).permute(0, 3, 5, 2, 4, 1).reshape(b, ph * pw, nh * nw, d)
        y = y.softmax(-1)
        return y.view(b, ph, pw, nh, nw, d).permute(0, 5, 3, 1, 4, 2).reshape(b, d, h, w)


# (model, input shape, sites, largest rank left)
LOWER_RANK_CASES = [
    (TimmAttention(), (2, 8, 16), 3, 4),
    (TimmAttention(index=True), (1, 8, 16), 3, 4),
    (TimmAttention(dim=24, heads=3), (1, 5, 24), 3, 4),
    (SplitQKV(), (2, 4, 12), 3, 4),
    (SplitQKV(chunk=True), (1, 4, 12), 3, 4),
    (WindowPartition(), (1, 4, 6, 8), 2, 4),
    (WindowPartition(ws=3, transpose=True), (2, 6, 9, 4), 2, 4),
    (WindowQKV(), (1, 4, 4, 8), 3, 5),  # the q/k/v ends are rank 5: lowered from 6 to 5 only
    (Patchify(), (2, 3, 4, 6), 2, 4),
    (Patchify(p=4), (1, 2, 8, 8), 2, 4),
    (MobileViTUnfold(), (1, 8, 4, 6), 2, 4),
    (MobileViTUnfold(ph=2, pw=3), (2, 4, 4, 6), 2, 4),
]


@pytest.mark.parametrize("model,shape,sites,rank", LOWER_RANK_CASES,
                         ids=[f"{type(c[0]).__name__}-{'x'.join(map(str, c[1]))}" for c in LOWER_RANK_CASES])
def test_lower_rank_is_exact_and_lowers(model, shape, sites, rank) -> None:
    model = model.eval()
    r = run_pipeline(model, (torch.randn(shape),), ["lower_rank"])
    assert r.reports[0].sites == sites
    assert graph_max_rank(r.program) == rank
    check_equal(model, r.model, shape)


def test_lower_rank_after_select_to_slice() -> None:
    """In the default pipeline select_to_slice runs first: q = qkv[0] arrives as slice + squeeze."""
    model = TimmAttention(index=True).eval()
    r = run_pipeline(model, (torch.randn(1, 8, 16),), ["select_to_slice", "lower_rank"])
    assert [p.sites for p in r.reports] == [3, 3]
    assert graph_max_rank(r.program) == 4
    check_equal(model, r.model, (1, 8, 16))


class Rank5Compute(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, c, 2, h // 2, w).sum(2)  # a compute op on the rank-5 tensor


class Rank5Expand(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(2).expand(-1, -1, 3, -1, -1).reshape(x.shape[0], -1, x.shape[-1], x.shape[-1])


class EightAxes(nn.Module):
    """Reverses 8 axes at once: no rank-4 form within the search limit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape((2,) * 8).permute(*reversed(range(8))).reshape(16, 16) + 1


@pytest.mark.parametrize("model,shape", [(Rank5Compute(), (1, 3, 4, 4)), (Rank5Expand(), (1, 2, 4, 4)),
                                         (EightAxes(), (4, 4, 4, 4))])
def test_lower_rank_leaves_what_it_cannot_lower(model, shape) -> None:
    r = run_pipeline(model, (torch.randn(shape),), ["lower_rank"])
    assert r.reports[0].sites == 0
    assert graph_max_rank(r.program) > 4


def test_lower_rank_reports_rank5_tensors_feeding_compute() -> None:
    x = torch.randn(1, 4, 4, 8)
    gm = capture(WindowQKV().eval(), (x,)).module()
    annotate(gm, (x,))
    lower = LowerRank()
    assert lower.run(PassContext(gm, (x,))) == 3
    # q * k, (q * k) + v and the sum over the windows all compute at rank 5
    assert len(lower.notes) == 5 and all("rank-5" in n for n in lower.notes)


@pytest.mark.parametrize("seed", range(12))
def test_plan_low_rank_random_rank6_views(seed: int) -> None:
    """Any reshape → permute → reshape (+ slice) through rank 6 gets an exact rank ≤ 4 plan."""
    rng = random.Random(seed)
    fine = [rng.choice([1, 2, 3, 4]) for _ in range(6)]
    perm = list(range(6))
    rng.shuffle(perm)
    src = torch.arange(math.prod(fine)).reshape(fine[0] * fine[1], fine[2] * fine[3], fine[4] * fine[5])
    view = src.reshape(fine).permute(perm)
    if rng.random() < 0.5 and view.shape[0] > 1:  # and sometimes a piece of it, like q of a fused qkv
        view = view[1:]
    out_shape = [math.prod(view.shape[:2]), math.prod(view.shape[2:4]), math.prod(view.shape[4:])]
    indices = view.reshape(out_shape)
    ops = plan_low_rank(src.shape, indices)
    assert ops is not None
    rebuilt, top = replay(ops, src)
    assert torch.equal(rebuilt, indices) and top <= 4


def test_plan_low_rank_counts_steps_for_known_layouts() -> None:
    """Window partition is one transpose (its rank-4 form); patchify needs two."""
    x = torch.arange(1 * 8 * 12 * 4).reshape(1, 8, 12, 4)
    windows = x.view(1, 4, 2, 6, 2, 4).permute(0, 1, 3, 2, 4, 5).reshape(-1, 2, 2, 4)
    ops = plan_low_rank(x.shape, windows)
    assert [op.__name__ for op, _ in ops] == ["reshape.default", "permute.default", "reshape.default"]
    assert ops[0][1] == ([4, 2, 6, 8],)
    img = torch.arange(2 * 3 * 4 * 6).reshape(2, 3, 4, 6)
    tokens = img.view(2, 3, 2, 2, 3, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 6, 12)
    assert sum(op.__name__ == "permute.default" for op, _ in plan_low_rank(img.shape, tokens)) == 2


@pytest.mark.slow
def test_lower_rank_coreml_rank6_only_with_pass(tmp_path: Path) -> None:
    """coremltools 9 lowers reshape→transpose→reshape itself, but not a rank-6 chain ending in unbind."""
    model, x = WindowQKV().eval(), torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="Core ML only supports tensors with rank <= 5"):
        convert("coreml", capture(model, (x,)), (x,), tmp_path / "before.mlpackage")
    r = run_pipeline(model, (x,), ["lower_rank"])
    assert convert("coreml", r.program, (x,), tmp_path / "after.mlpackage").exists()


@pytest.mark.slow
@pytest.mark.parametrize("model,shape,before", [(TimmAttention(), (1, 8, 16), 5), (WindowPartition(), (1, 4, 6, 8), 6)],
                         ids=["timm-attention", "window-partition"])
def test_lower_rank_tflite_tensors_rank4_only_with_pass(tmp_path: Path, model, shape, before) -> None:
    """litert-torch keeps the rank-5/6 tensors (GPU delegate and NNAPI take rank ≤ 4)."""
    model, x = model.eval(), torch.randn(shape)
    assert tflite_max_rank(convert("tflite", capture(model, (x,)), (x,), tmp_path / "before.tflite")) == before
    r = run_pipeline(model, (x,), ["lower_rank"])
    after = convert("tflite", r.program, (x,), tmp_path / "after.tflite")
    assert tflite_max_rank(after) <= 4
    np.testing.assert_allclose(tflite_run(after, x), model(x).detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_lower_rank_onnx_coreml_ep_rank_problem_gone(tmp_path: Path) -> None:
    from edgevit.export.backends.onnx.coverage import onnx_ep_coverage

    model, x = WindowPartition(), torch.randn(1, 4, 6, 8)
    before = onnx_ep_coverage(convert("onnx", capture(model, (x,)), (x,), tmp_path / "before.onnx"), "coreml")
    assert any("rank" in p for p in before.problems), before.problems  # "rank>5: ai.onnx:Reshape"
    r = run_pipeline(model, (x,), ["lower_rank"])
    after = onnx_ep_coverage(convert("onnx", r.program, (x,), tmp_path / "after.onnx"), "coreml")
    assert not after.problems and after.whole


def test_layout_passes_are_in_every_default_pipeline() -> None:
    from edgevit.export.passes import default_pipeline
    from edgevit.export.targets import TARGETS

    for target in TARGETS.values():
        for acc in target.accelerators:
            pipeline = default_pipeline(target.name, acc.name)
            mine = [p for p in pipeline if p in ("unfold_fold_static", "pixel_unshuffle_rank4", "lower_rank")]
            assert mine == ["unfold_fold_static", "pixel_unshuffle_rank4", "lower_rank"]

