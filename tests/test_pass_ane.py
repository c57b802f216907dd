"""ANE layout passes (ane_linear_to_conv, ane_channel_layer_norm, ane_cancel_transposes).

Apple's ml-ane-transformers habit: the reference model and the accelerator-friendly rewrite side by
side with a numerical equivalence test. Here the reference is the captured model and the rewrite is
the pass output; the backend reason is shown on the converted MIL program (``conv`` on rank-4
(B, C, 1, S) tensors instead of ``linear`` on rank-3 ones). Core ML prediction cannot run on Linux,
so no latency is measured: the ANE benefit of that layout is Apple's published claim.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgevit.export.passes import default_pipeline, run_pipeline

U = 2.0 ** -24  # fp32 unit roundoff
ANE = ["ane_linear_to_conv", "ane_channel_layer_norm", "ane_cancel_transposes"]
LAYOUT_ATEN = {"transpose.int", "permute.default", "reshape.default", "view.default", "unsqueeze.default",
               "squeeze.dim", "squeeze.dims", "flatten.using_ints", "select.int", "slice.Tensor"}
LAYOUT_MIL = {"transpose", "reshape", "squeeze", "expand_dims", "slice_by_index", "gather"}


def aten_counts(graph: torch.fx.Graph) -> collections.Counter:
    return collections.Counter(str(n.target).replace("aten.", "") for n in graph.nodes if n.op == "call_function")


def layout_ops(counts: collections.Counter) -> int:
    return sum(v for k, v in counts.items() if k in LAYOUT_ATEN)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def run64(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module`` in float64: an algebraically exact rewrite then agrees to ~1e-15, not ~1e-7."""
    import copy
    with torch.no_grad():
        return copy.deepcopy(module).double()(x.double())


# --- tiny modules with the patterns ---------------------------------------------------------------

class Mlp(nn.Module):
    def __init__(self, c: int, hidden: int, out: int, bias: bool = True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, hidden, bias=bias), nn.Linear(hidden, out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TinyViT(nn.Module):
    """A ViT-like stack: pre-norm blocks (LayerNorm, fused or separate q/k/v linears, softmax attention,
    GELU MLP, residuals), an optional class token and a linear head on it."""

    def __init__(self, dim: int = 32, heads: int = 2, depth: int = 2, fused_qkv: bool = True, cls: bool = True):
        super().__init__()
        self.heads, self.fused, self.cls = heads, fused_qkv, cls
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            blk = nn.Module()
            blk.n1, blk.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            if fused_qkv:
                blk.qkv = nn.Linear(dim, 3 * dim)
            else:
                blk.q, blk.k, blk.v = (nn.Linear(dim, dim) for _ in range(3))
            blk.proj, blk.mlp = nn.Linear(dim, dim), Mlp(dim, 4 * dim, dim)
            self.blocks.append(blk)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)
        with torch.no_grad():  # non-trivial affines: a swapped (out + b) * w order would show
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.weight[:2] = 0.0  # Apple's bias / weight correction would divide by these
                    m.bias.uniform_(-0.5, 0.5)

    def attn(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        if self.fused:
            q, k, v = blk.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (lin(x).reshape(b, n, self.heads, -1).transpose(1, 2) for lin in (blk.q, blk.k, blk.v))
        a = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return blk.proj((a @ v).transpose(1, 2).reshape(b, n, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = x + self.attn(blk, blk.n1(x))
            x = x + blk.mlp(blk.n2(x))
        x = self.norm(x)
        return self.head(x[:, 0] if self.cls else x.mean(1))


# --- pipeline membership ----------------------------------------------------------------------

def test_ane_passes_run_last_in_the_coreml_pipeline_only() -> None:
    pipe = list(default_pipeline("coreml", "ane"))
    # the norm pass sorts before the linear pass at the same order, so it still sees the linears
    assert [p for p in pipe if p in ANE] == ["ane_channel_layer_norm", "ane_linear_to_conv", "ane_cancel_transposes"]
    assert not [p for p in pipe[pipe.index("ane_channel_layer_norm"):] if p not in [*ANE, "ane_split_heads"]
                and p not in ("fold_scale_into_linear", "sink_slices")]  # only the final-graph passes follow
    for target, acc in [("onnx", "coreml"), ("tflite", "xnnpack"), ("openvino", "npu")]:
        assert not set(ANE) & set(default_pipeline(target, acc))


# --- ane_linear_to_conv -----------------------------------------------------------------------

@pytest.mark.parametrize("shape,out,bias", [((2, 7, 16), 24, True), ((1, 197, 64), 256, False),
                                            ((3, 16), 10, True), ((1, 5, 3), 1, True)])
def test_linear_to_conv_matches_within_fp32_dot_product_bound(shape: tuple, out: int, bias: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(shape[-1], out, bias=bias)).eval()
    x = torch.randn(shape)
    r = run_pipeline(model, (x,), ["ane_linear_to_conv"])
    counts = aten_counts(r.program.graph)
    assert r.reports[0].sites == 1 and counts["linear.default"] == 0 and counts["conv2d.default"] == 1
    with torch.no_grad():
        ref, got = model(x), r.model(x)
        # Both are fp32 sums of the same K products: each within gamma_K * sum|w x| of the exact value
        # (Higham), so they differ by at most 2 * gamma_(K+1) * (|x| @ |W|^T + |b|), element-wise.
        lin = model[0]
        mag = x.abs() @ lin.weight.abs().T + (lin.bias.abs() if bias else 0)
        k = shape[-1] + 1
        assert ((got - ref).abs() <= 2 * k * U / (1 - k * U) * mag).all()
    assert max_rel(run64(r.model, x), run64(model, x)) < 1e-13  # the same function, re-associated


def test_pooled_head_goes_into_the_conv_without_extra_layout_ops() -> None:
    """Conv features -> global average pool -> linear head: the pool keeps its dims for the head's
    (B, C, 1, 1) conv, so only the way out to (B, classes) is added."""
    torch.manual_seed(5)

    class PoolHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 24, 3), nn.Linear(24, 7)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.conv(x).mean((2, 3)))

    model, x = PoolHead().eval(), torch.randn(2, 3, 9, 9)
    r = run_pipeline(model, (x,), ["ane_linear_to_conv", "ane_cancel_transposes"])
    counts = aten_counts(r.program.graph)
    assert counts["linear.default"] == 0 and counts["conv2d.default"] == 2 and layout_ops(counts) == 1
    with torch.no_grad():  # one length-24 dot product (+ bias): the elementwise bound of the first test
        pooled = model.conv(x).mean((2, 3))
        mag = pooled.abs() @ model.head.weight.abs().T + model.head.bias.abs()
        assert ((r.model(x) - model(x)).abs() <= 2 * 25 * U / (1 - 25 * U) * mag).all()


def test_linear_to_conv_leaves_unsure_sites_alone() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin4 = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            y = self.lin4(x.reshape(1, 2, 3, 8))  # rank 4: not a token tensor, left alone
            return F.linear(y.reshape(1, 6, 8), w)  # weight is an input, not a constant kernel

    x, w = torch.randn(1, 6, 8), torch.randn(4, 8)
    r = run_pipeline(Odd().eval(), (x, w), ["ane_linear_to_conv"])
    assert r.reports[0].sites == 0 and aten_counts(r.program.graph)["linear.default"] == 2


# --- ane_channel_layer_norm -------------------------------------------------------------------

class NormLinear(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(dim), nn.Linear(dim, 8)
        with torch.no_grad():  # non-trivial affine: a swapped (out + b) * w order would show
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.weight[:2] = 0.0  # Apple's bias / weight correction would divide by these
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.norm(x)
        return y, self.lin(y)


@pytest.mark.parametrize("shape", [(2, 7, 16), (1, 197, 192), (3, 1, 48)])
def test_channel_layer_norm_matches_with_torch_affine_order(shape: tuple) -> None:
    torch.manual_seed(1)
    model, x = NormLinear(shape[-1]).eval(), 3 * torch.randn(shape) + 1
    r = run_pipeline(model, (x,), ["ane_channel_layer_norm"])
    assert r.reports[0].sites == 1 and aten_counts(r.program.graph)["layer_norm.default"] == 0
    with torch.no_grad():
        ref, got = model(x)[0], r.model(x)[0]
    # mean and variance are length-C fp32 reductions (error ~C*u relative each), the rest O(u):
    # 4 * C * u of the output scale covers both evaluations and both reductions.
    assert max_rel(got, ref) <= 4 * shape[-1] * U
    assert max_rel(run64(r.model, x)[0], run64(model, x)[0]) < 1e-12
    # the full ViT: every norm sits next to a linear (n1, n2) or a residual fed by one (final norm)
    vit = TinyViT(dim=shape[-1], heads=2, depth=1).eval()
    assert run_pipeline(vit, (x,), ["ane_channel_layer_norm"]).reports[0].sites == 3


def test_channel_layer_norm_leaves_a_lone_norm_alone() -> None:
    model = nn.Sequential(nn.LayerNorm(16), nn.Softmax(-1)).eval()
    r = run_pipeline(model, (torch.randn(1, 5, 16),), ["ane_channel_layer_norm"])
    assert r.reports[0].sites == 0 and aten_counts(r.program.graph)["layer_norm.default"] == 1


# --- ane_cancel_transposes --------------------------------------------------------------------

class ChannelScale(nn.Module):
    """A per-channel scale on (B, C, 1, S): a layout-independent stand-in for a 1x1 conv."""

    def __init__(self, c: int, out: int):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Bc1sPingPong(nn.Module):
    """ANE ops on (B, C, 1, S) with the layout changes around each, as ane_linear_to_conv emits them."""

    def __init__(self, c: int = 16, conv: bool = True):
        super().__init__()
        op = nn.Conv2d if conv else (lambda i, o, k: ChannelScale(i, o))
        self.c1, self.c2 = op(c, c if not conv else 4 * c, 1), op(c if not conv else 4 * c, c, 1)
        self.pos = nn.Parameter(torch.randn(c))
        # PyTorch's CPU GELU differs by an ulp between contiguous (vectorised erf) and strided
        # (scalar erf) inputs, so the bit-exact variant uses ReLU
        self.act = F.gelu if conv else F.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, S, C)
        h = self.c1(x.transpose(1, 2).unsqueeze(2)).squeeze(2).transpose(1, 2)
        h = self.act(h) * 0.5
        h = self.c2(h.transpose(1, 2).unsqueeze(2)).squeeze(2).transpose(1, 2)
        y = x + h + self.pos  # residual: one side in BC1S, one not, plus a broadcast constant
        return self.c2(self.c1(y.transpose(1, 2).unsqueeze(2))).squeeze(2).transpose(1, 2)


@pytest.mark.parametrize("conv", [False, True])
def test_cancel_transposes_keeps_mlp_and_residual_in_bc1s(conv: bool) -> None:
    torch.manual_seed(2)
    model, x = Bc1sPingPong(conv=conv).eval(), torch.randn(2, 9, 16)
    before = aten_counts(run_pipeline(model, (x,), []).program.graph)
    r = run_pipeline(model, (x,), ["ane_cancel_transposes"])
    after = aten_counts(r.program.graph)
    assert r.reports[0].sites > 0
    # 3 changes in and 3 out before; after: x goes in once and the result comes out once
    assert before["transpose.int"] == 6 and after["transpose.int"] == 2, after
    assert layout_ops(after) == 4
    with torch.no_grad():
        got, ref = r.model(x), model(x)
    if not conv:  # only the layout moved: same values through the same element-wise ops
        assert torch.equal(got, ref)
    else:  # a conv on a channels-first instead of a (strided) channels-last input sums in another
        # order (and GELU takes its vectorised path): within the fp32 bound of a length-64
        # reduction, and identical in float64
        assert max_rel(got, ref) <= 4 * 64 * U
        assert max_rel(run64(r.model, x), run64(model, x)) < 1e-13


def random_layout_ops(shape: list[int], gen: torch.Generator) -> tuple[list[tuple], list[int]]:
    """A random chain of transpose / permute / merge-reshape / (un)squeeze / split-item ops."""
    def pick(n: int) -> int:
        return int(torch.randint(n, (1,), generator=gen))

    ops: list[tuple] = []
    cur = list(shape)
    for _ in range(2 + pick(4)):
        kind = pick(6)
        if kind == 0 and len(cur) > 1:
            a, b = pick(len(cur)), pick(len(cur))
            ops.append(("transpose", a, b))
            cur[a], cur[b] = cur[b], cur[a]
        elif kind == 1:
            perm = torch.randperm(len(cur), generator=gen).tolist()
            ops.append(("permute", perm))
            cur = [cur[p] for p in perm]
        elif kind == 2 and len(cur) > 1:  # merge two neighbours
            i = pick(len(cur) - 1)
            cur = cur[:i] + [cur[i] * cur[i + 1]] + cur[i + 2:]
            ops.append(("reshape", list(cur)))
        elif kind == 3 and len(cur) < 5:
            d = pick(len(cur) + 1)
            ops.append(("unsqueeze", d))
            cur.insert(d, 1)
        elif kind == 4 and 1 in cur and len(cur) > 1:
            d = cur.index(1)
            ops.append(("squeeze", d))
            cur.pop(d)
        elif kind == 5:  # one of the first two equal pieces
            d = pick(len(cur))
            if cur[d] > 1:
                ops.append(("split", d, cur[d] // 2, pick(2)))
                cur[d] = cur[d] // 2
    return ops, cur


def apply_layout_ops(x: torch.Tensor, ops: list[tuple]) -> torch.Tensor:
    for op in ops:
        x = x.split(op[2], op[1])[op[3]] if op[0] == "split" else getattr(x, op[0])(*op[1:])
    return x


@pytest.mark.parametrize("seed", range(16))
def test_cancel_transposes_chains_are_exact_and_never_longer(seed: int) -> None:
    """Random chains of layout ops between element-wise ops, half of them with a shared prefix read
    by two different tails: the rewritten graph gathers the same elements with at most as many ops."""
    gen = torch.Generator().manual_seed(seed)
    shape = [2, 6, 1, 4] if seed % 2 else [3, 4, 10]
    shared, cur = random_layout_ops(shape, gen)
    tails = [random_layout_ops(cur, gen)[0] for _ in range(1 + seed % 2)]

    class Chain(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            y = apply_layout_ops(x * 2.0, shared)
            return tuple(apply_layout_ops(y, tail) + float(i) for i, tail in enumerate(tails))

    model, x = Chain(), torch.randn(shape)
    before = run_pipeline(model, (x,), []).program.graph
    r = run_pipeline(model, (x,), ["ane_cancel_transposes"])
    layout = LAYOUT_ATEN | {"split.Tensor", "unbind.int"}
    assert sum(v for k, v in aten_counts(r.program.graph).items() if k in layout) <= \
        sum(v for k, v in aten_counts(before).items() if k in layout)
    with torch.no_grad():
        for got, ref in zip(r.model(x), model(x)):
            assert torch.equal(got, ref)


def test_cancel_transposes_leaves_a_graph_without_inverse_pairs_alone() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU()).eval()
    r = run_pipeline(model, (torch.randn(1, 4, 8),), ["ane_cancel_transposes"])
    assert r.reports[0].sites == 0


# --- the ANE stack on a ViT ----------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [dict(dim=32, heads=2, depth=2, fused_qkv=True, cls=True),
                                 dict(dim=48, heads=3, depth=1, fused_qkv=False, cls=False),
                                 dict(dim=64, heads=4, depth=3, fused_qkv=True, cls=True)])
def test_tiny_vit_ane_layout_is_equivalent(cfg: dict) -> None:
    torch.manual_seed(3)
    model, x = TinyViT(**cfg).eval(), torch.randn(1, 17, cfg["dim"])
    before = aten_counts(run_pipeline(model, (x,), ["select_to_slice"]).program.graph)
    r = run_pipeline(model, (x,), ["select_to_slice", *ANE])
    after = aten_counts(r.program.graph)
    assert after["linear.default"] == 0 and after["layer_norm.default"] == 0
    assert after["conv2d.default"] == before["linear.default"]
    # the layout ops do not explode: at most the entry change (x arrives as (B, S, C): 2 ops) and the
    # rank-2 head's way out of (B, O, 1, 1) (1 op) on top; per block they do not grow
    assert layout_ops(after) <= layout_ops(before) + 3, (before, after)
    with torch.no_grad():
        assert max_rel(r.model(x), model(x)) <= 1e-5  # fp32 re-association through the blocks
    assert max_rel(run64(r.model, x), run64(model, x)) < 1e-12


def test_default_coreml_pipeline_reads_qkv_straight_from_the_conv() -> None:
    """With the whole coreml:ane pipeline (lower_rank first splits the rank-5 fused-qkv reshape into
    three slices of a shared (S, 3C) view): q, k, v are sliced straight out of the (B, 3C, 1, S) conv."""
    torch.manual_seed(6)
    model, x = TinyViT(dim=32, heads=2, depth=2).eval(), torch.randn(1, 17, 32)
    pipe = list(default_pipeline("coreml", "ane"))
    others = [p for p in pipe if p not in ANE]
    before = aten_counts(run_pipeline(model, (x,), others).program.graph)
    r = run_pipeline(model, (x,), pipe)
    after = aten_counts(r.program.graph)
    assert after["linear.default"] == 0 and layout_ops(after) < layout_ops(before), (before, after)
    convs = [n for n in r.program.graph.nodes if str(n.target) == "aten.conv2d.default"]
    qkv = [n for n in convs if n.meta["val"].shape[1] == 96]
    assert len(qkv) == 2  # one per block
    for conv in qkv:  # ane_split_heads reads each head's q, k and v: 3 x 2 heads
        assert sorted(str(u.target) for u in conv.users) == ["aten.slice.Tensor"] * 6
    with torch.no_grad():
        assert max_rel(r.model(x), model(x)) <= 1e-5


# --- the reason: the Core ML program --------------------------------------------------------------

def mil_ops(path: Path) -> list[tuple[str, int]]:
    """(op type, rank of its first output) of every op in the MIL main function."""
    import coremltools as ct

    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    block = next(iter(spec.mlProgram.functions["main"].block_specializations.values()))
    return [(op.type, op.outputs[0].type.tensorType.rank if op.outputs else -1) for op in block.operations]


def coreml_ops(program: torch.export.ExportedProgram, x: torch.Tensor, out: Path) -> list[tuple[str, int]]:
    pytest.importorskip("coremltools")
    from edgevit.export.targets import get_target

    get_target("coreml").converter_module().convert(program, (x,), out, "fp16")
    return mil_ops(out)


@pytest.mark.slow
def test_coreml_program_has_rank4_convs_instead_of_rank3_linears(tmp_path: Path) -> None:
    torch.manual_seed(4)
    model, x = TinyViT(dim=32, heads=2, depth=1).eval(), torch.randn(1, 16, 32)
    before = coreml_ops(run_pipeline(model, (x,), ["select_to_slice"]).program, x, tmp_path / "a.mlpackage")
    after = coreml_ops(run_pipeline(model, (x,), ["select_to_slice", *ANE]).program, x, tmp_path / "b.mlpackage")
    b, a = collections.Counter(before), collections.Counter(after)
    assert b[("linear", 3)] == 4 and b[("linear", 2)] == 1 and b[("layer_norm", 3)] == 3
    assert not [op for op in after if op[0] == "linear"]
    assert a[("conv", 4)] == 5 and a[("layer_norm", 4)] == 3  # norms fused back, now over axis 1


# --- deit_tiny from the zoo -------------------------------------------------------------------

@pytest.fixture(scope="module")
def deit() -> tuple:
    from edgevit import create_model

    torch.manual_seed(0)
    model, x = create_model("deit_tiny").eval(), torch.randn(1, 3, 224, 224)
    base = run_pipeline(model, (x,), ["strip_aliases", "select_to_slice"])
    ane = run_pipeline(model, (x,), ["strip_aliases", "select_to_slice", *ANE])
    return model, x, base, ane


@pytest.mark.slow
def test_deit_tiny_ane_layout_is_equivalent(deit: tuple) -> None:
    model, x, base, ane = deit
    before, after = aten_counts(base.program.graph), aten_counts(ane.program.graph)
    # measured: linear 49 -> 0; transpose 61 -> 36, reshape 48 -> 50, all layout ops 112 -> 87
    assert before["linear.default"] == 49 and after["linear.default"] == 0
    assert after["conv2d.default"] == 50 and after["layer_norm.default"] == 0
    assert after["transpose.int"] + after["permute.default"] < before["transpose.int"] + before["permute.default"]
    assert layout_ops(after) < layout_ops(before), (before, after)
    with torch.no_grad():
        assert max_rel(ane.model(x), model(x)) <= 1e-5
    assert max_rel(run64(ane.model, x), run64(model, x)) < 1e-12
    n_params = sum(p.numel() for p in model.parameters())  # re-laid-out weights replace, not duplicate
    assert sum(v.numel() for v in ane.program.state_dict.values()) == n_params


@pytest.mark.slow
def test_deit_tiny_coreml_program_runs_in_bc1s(deit: tuple, tmp_path: Path) -> None:
    _, x, base, ane = deit
    before = collections.Counter(op for op, _ in coreml_ops(base.program, x, tmp_path / "a.mlpackage"))
    after_ops = coreml_ops(ane.program, x, tmp_path / "b.mlpackage")
    after = collections.Counter(op for op, _ in after_ops)
    ranked = collections.Counter(after_ops)
    # measured: linear 49 -> 0, conv 1 -> 50 (all rank 4), layer_norm 25 (rank 3 -> rank 4),
    # transpose 49 -> 24, reshape 49 -> 50, layout ops in all 100 -> 75
    assert before["linear"] == 49 and after["linear"] == 0
    assert ranked[("conv", 4)] == 50 and ranked[("layer_norm", 4)] == 25
    assert after["transpose"] < before["transpose"]
    assert sum(after[k] for k in LAYOUT_MIL) < sum(before[k] for k in LAYOUT_MIL)
