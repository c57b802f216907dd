"""Audit of the passes' assumptions about models nobody here has seen: strides, dtypes, aliasing.

The captured graph is the non-functional training IR: in-place ops (``add_``, ``relu_``, the ``fill_`` /
``copy_`` of a slice that ``x[:, 0] = v`` becomes) stay in it, and views share storage with their input.
One test per finding, named after the pass and the assumption, with what used to go wrong; then
user-code patterns through every default pipeline. Every run is strict (a rollback is an error) and
compares the rewritten graph with the model on two consecutive calls (a buffer written by the graph
would show on the second).
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgevit.export.capture import capture, flatten_outputs
from edgevit.export.passes import PASSES, default_pipeline, run_pipeline
from edgevit.export.passes.base import PassContext, annotate
from edgevit.export.targets import TARGETS


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...], names: Sequence[str]) -> Any:
    """``run_pipeline`` with rollbacks turned into errors (``strict``): a finding must be fixed, not absorbed."""
    return run_pipeline(model.eval(), inputs, list(names), strict=True)


def _same(result: Any, model: nn.Module, inputs: tuple[torch.Tensor, ...], atol: float = 1e-5) -> None:
    """The rewritten graph gives the model's outputs, on two consecutive calls (fresh input copies)."""
    for _ in range(2):
        with torch.no_grad():
            want = flatten_outputs(model(*(t.clone() for t in inputs)))
            got = flatten_outputs(result.model(*(t.clone() for t in inputs)))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=atol)


def _sites(result: Any, name: str) -> int:
    return next(r.sites for r in result.reports if r.name == name)


def _targets(result: Any) -> list[str]:
    return [str(n.target) for n in result.model.graph.nodes if n.op == "call_function"]


# --- fold_constant_gathers ---------------------------------------------------------------------------


class _Accumulate(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        acc = torch.zeros(2, 4)
        acc += x  # add_ on a factory tensor
        keep = torch.ones(2, 4)
        keep[:, 2:] = 0  # fill_ of a slice: the readers below still name the ``ones`` node
        return acc * 1, x * keep


def test_fold_constant_gathers_leaves_tensors_written_in_place() -> None:
    """``zeros``/``ones`` written in place were folded into a buffer that ``add_`` then grew on every run."""
    model, x = _Accumulate(), (torch.randn(2, 4),)
    result = _run(model, x, ["fold_constant_gathers"])
    _same(result, model, x)
    assert not [n for n, _ in result.model.named_buffers() if "folded" in n]


# --- sdpa_to_explicit --------------------------------------------------------------------------------


class _SetitemMask(nn.Module):
    def forward(self, q: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(4, 4, dtype=torch.bool)
        mask[:, 2:] = False  # key padding written into the mask after it was made
        return F.scaled_dot_product_attention(q, q * 0.5, q + 1, attn_mask=mask)


def test_sdpa_to_explicit_mask_written_in_place() -> None:
    """A mask built by slice assignment was read as the all-True ``ones`` it started from."""
    model, x = _SetitemMask(), (torch.randn(1, 2, 4, 8),)
    result = _run(model, x, ["sdpa_to_explicit"])
    assert _sites(result, "sdpa_to_explicit") == 1  # as a runtime boolean mask
    _same(result, model, x)


# --- static_gather_scatter ---------------------------------------------------------------------------


class _SetitemIndex(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(4)
        idx[0] = 3  # the readers of idx still name the ``arange`` node
        return x.index_select(1, idx)


def test_static_gather_scatter_index_written_in_place() -> None:
    """An index tensor changed by ``idx[0] = 3`` was folded as the ``arange`` it started from."""
    model, x = _SetitemIndex(), (torch.randn(2, 4),)
    _same(_run(model, x, ["static_gather_scatter"]), model, x)


class _GatherThenWrite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("idx", torch.tensor([1, 2]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = x * 1
        y = h.index_select(1, self.idx)  # a copy ...
        y.add_(1)  # ... written in place: h must not change
        return y, h


def test_static_gather_scatter_gather_result_written_in_place() -> None:
    """A one-run gather became a slice, a view of x: ``y.add_`` then wrote x as well."""
    model, x = _GatherThenWrite(), (torch.randn(2, 4),)
    _same(_run(model, x, ["static_gather_scatter"]), model, x)


class _LiteralIndex(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, torch.tensor([5, 3, 1, 0, 2, 4]))


def test_static_gather_scatter_torch_tensor_literal_index() -> None:
    """A ``torch.tensor([...])`` index is captured as lift_fresh_copy + ``detach_``; the fold did not know
    ``detach_``, so the commonest spelling of a constant index kept its Gather."""
    model, x = _LiteralIndex(), (torch.randn(2, 6),)
    result = _run(model, x, ["static_gather_scatter"])
    assert _sites(result, "static_gather_scatter") == 1
    assert "aten.index_select.default" not in _targets(result)
    _same(result, model, x)


# --- layout rewrites and a later ``view`` ---------------------------------------------------------------


class _SoftmaxView(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.softmax(1).view(x.shape[0], -1)


def test_softmax_last_axis_keeps_a_later_view_valid() -> None:
    """The softmax came back as a transposed view and ``.view(B, -1)`` after it raised."""
    model, x = _SoftmaxView(), (torch.randn(2, 5, 3),)
    result = _run(model, x, ["softmax_last_axis"])
    assert _sites(result, "softmax_last_axis") == 1
    _same(result, model, x)
    result.program  # noqa: B018 - the repaired graph is captured again


class _EinsumView(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ij,jk->ki", a, b).view(-1)  # torch's einsum returns it contiguous


def test_einsum_to_matmul_keeps_a_later_view_valid() -> None:
    """``matmul`` + ``permute`` is not contiguous where torch's einsum result was: ``.view(-1)`` raised."""
    model, x = _EinsumView(), (torch.randn(3, 4), torch.randn(4, 5))
    result = _run(model, x, ["einsum_to_matmul"])
    assert _sites(result, "einsum_to_matmul") == 1
    _same(result, model, x)


class _PoolView(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, (3, 2)).view(x.shape[0], -1)  # the classic classifier flatten


def test_adaptive_pool_static_keeps_a_later_view_valid() -> None:
    """The transpose-matmul-transpose pool came back transposed and ``.view(B, -1)`` after it raised."""
    model, x = _PoolView(), (torch.randn(2, 3, 7, 5),)
    result = _run(model, x, ["adaptive_pool_static"])
    assert _sites(result, "adaptive_pool_static") == 1
    _same(result, model, x)


class _HeadsView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        return ((q @ k.transpose(-2, -1)).softmax(-1) @ v).view(b, 2, n * 4)


def test_ane_split_heads_keeps_a_later_view_valid() -> None:
    """The per-head output came back as a transposed (B, H, S, D) and ``.view`` after it raised."""
    model, x = _HeadsView(), (torch.randn(1, 5, 8),)
    result = _run(model, x, ["ane_split_heads"])
    assert _sites(result, "ane_split_heads") == 1
    _same(result, model, x)


# --- adaptive_pool_static / expand_to_broadcast: copies that became aliases ------------------------------


class _IdentityPoolThenWrite(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 1
        y = F.adaptive_avg_pool2d(h, (4, 4))  # same size: a copy of h
        y.add_(1)
        return y + h


def test_adaptive_pool_static_identity_pool_written_in_place() -> None:
    """An identity pool became its input; ``y.add_`` then wrote the input too."""
    model, x = _IdentityPoolThenWrite(), (torch.randn(1, 2, 4, 4),)
    _same(_run(model, x, ["adaptive_pool_static"]), model, x)


class _RepeatThenWrite(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 1
        r = h.repeat(1, 1)  # a copy
        r.add_(1)
        return r + h


def test_expand_to_broadcast_repeat_written_in_place() -> None:
    """A shape-preserving ``repeat`` (a copy) was dropped; ``r.add_`` then wrote its source too."""
    model, x = _RepeatThenWrite(), (torch.randn(2, 4),)
    _same(_run(model, x, ["expand_to_broadcast"]), model, x)


# --- lower_rank / pixel_unshuffle_rank4: chains rebuilt as views --------------------------------------------


class _CloneThenWrite(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = x * 1
        y = h.reshape(1, 1, 1, 1, 2, 3).clone().reshape(2, 3)  # a rank-6 chain with a copy in it
        h.add_(1)
        return y + 0, h


def test_lower_rank_chain_with_a_copy_of_a_written_source() -> None:
    """The rank-6 chain was rebuilt as one reshape, a view of h: ``h.add_`` then reached y."""
    model, x = _CloneThenWrite(), (torch.randn(2, 3),)
    _same(_run(model, x, ["lower_rank"]), model, x)


class _UnshuffleThenWrite(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = x * 1
        y = F.pixel_unshuffle(h, 1)  # a copy
        y.add_(1)
        return y, h


def test_pixel_unshuffle_rank4_factor_one_written_in_place() -> None:
    """At r = 1 the reshape/permute chain is a view of the input: ``y.add_`` then wrote h as well."""
    model, x = _UnshuffleThenWrite(), (torch.randn(1, 2, 4, 4),)
    _same(_run(model, x, ["pixel_unshuffle_rank4"]), model, x)


# --- sink_slices ---------------------------------------------------------------------------------------


class _WriteBetween(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + 0
        y = h * 2  # computed before ...
        h.add_(1)  # ... h changes ...
        return y[:, :1] + h[:, :1]  # ... and sliced after


def test_sink_slices_reads_inputs_where_the_producer_did() -> None:
    """The sunk ``h[:, :1] * 2`` was placed at the slice, after ``h.add_(1)``, and read the new h."""
    model, x = _WriteBetween(), (torch.randn(2, 4),)
    result = _run(model, x, ["sink_slices"])
    assert _sites(result, "sink_slices") >= 1
    _same(result, model, x)


# --- norms: fp16 statistics ------------------------------------------------------------------------------


class _Norm(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.ln = nn.LayerNorm(8)
        self.gn = nn.GroupNorm(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return self.ln(x)
        if self.kind == "group":
            return self.gn(x)
        return F.normalize(x, dim=-1)


@pytest.mark.parametrize("kind, shape, name", [("layer", (2, 8), "decompose_layer_norm"),
                                               ("group", (2, 4, 3, 3), "decompose_group_norm"),
                                               ("vector", (2, 8), "decompose_vector_norm")])
def test_decompose_norms_leave_fp16_statistics_to_torch(kind: str, shape: tuple[int, ...], name: str) -> None:
    """fp16 primitives squared |x - mean| ~ 300 to inf (torch's fp16 norms accumulate in fp32): outputs 0."""
    torch.manual_seed(0)
    model, x = _Norm(kind).half(), ((torch.randn(shape) * 300).half(),)
    result = _run(model, x, [name])
    assert _sites(result, name) == 0
    _same(result, model, x, atol=1e-3)


def test_decompose_norms_still_rewrite_fp32() -> None:
    torch.manual_seed(0)
    model, x = _Norm("layer"), (torch.randn(2, 8) * 300,)
    result = _run(model, x, ["decompose_layer_norm"])
    assert _sites(result, "decompose_layer_norm") == 1
    _same(result, model, x)


class _UnbatchedConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv1d(4, 6, 1), nn.BatchNorm1d(6)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (4, 6): conv1d gives (6, 6), BN reads (N, C)
        return self.bn(self.conv(x))


def test_fold_batchnorm_unbatched_conv() -> None:
    """An unbatched conv1d's (C_out, L) output has its channels on axis 0; BN normalises axis 1: the
    BN was folded into the conv's output channels anyway (right only when C_out == L by coincidence)."""
    torch.manual_seed(0)
    model, x = _UnbatchedConvBn(), (torch.randn(4, 6),)
    result = _run(model, x, ["fold_batchnorm"])
    assert _sites(result, "fold_batchnorm") == 1  # as x * scale + shift
    assert "aten.conv1d.default" in _targets(result)
    _same(result, model, x)


# --- sizes that depend on the data ------------------------------------------------------------------------


class _KeptRows(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x[0][x[0].sum(-1) > 0]  # (u0, 8): how many rows is known only at run time
        return self.fc(rows).sum(0)


def _rows(kept: int) -> torch.Tensor:
    x = torch.randn(1, 6, 8).abs()
    x[0, kept:] *= -1
    return x


@pytest.mark.parametrize("name, sites", [("sum_to_mean", 1), ("ane_linear_to_conv", 0)])
def test_data_dependent_sizes_are_not_baked_in(name: str, sites: int) -> None:
    """The example's row count was baked in (``mean * 3``; a reshape to (3, 8, 1, 1)): another input's
    ``x[mask]`` gave wrong sums or a failing reshape. (The row sums of the mask itself are static.)"""
    torch.manual_seed(0)
    model = _KeptRows().eval()
    result = _run(model, (_rows(3),), [name])
    assert _sites(result, name) == sites
    other = (_rows(5),)
    with torch.no_grad():
        torch.testing.assert_close(result.model(*other), model(*other), rtol=1e-5, atol=1e-5)


# --- ane_cancel_transposes ---------------------------------------------------------------------------------


class _BitAbs(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.view(torch.int32) & 0x7FFFFFFF).view(torch.float32)  # |x| by clearing the sign bit


def test_ane_cancel_transposes_keeps_bit_reinterpreting_views() -> None:
    """``view(torch.int32)`` moves no element, so it was removed as a no-op chain: ``&`` then got floats."""
    model, x = _BitAbs(), (torch.randn(2, 3, 5),)
    _same(_run(model, x, ["ane_cancel_transposes"]), model, x)


class _TwinCopies(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = x.transpose(0, 1).reshape(6)  # two identical copies ...
        b = x.transpose(0, 1).reshape(6)
        a.add_(1)  # ... one of them written
        return a * 1, b * 1


class _SharedCopy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = x.transpose(0, 1).reshape(6)  # a copy read through two views ...
        a, b = r.view(2, 3), r.view(3, 2)
        a.add_(1)  # ... written through one: the other sees it
        return b * 1


@pytest.mark.parametrize("model", [_TwinCopies(), _SharedCopy()], ids=["merged", "duplicated"])
def test_ane_cancel_transposes_copies_written_in_place(model: nn.Module) -> None:
    """Layout CSE merged two copies (one written: both changed) or split one shared copy (the write no
    longer reached the other view); the merge also reported 0 sites, so the pipeline never checked it."""
    x = (torch.randn(2, 3),)
    _same(_run(model, x, ["ane_cancel_transposes"]), model, x)


class _Counter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.register_buffer("count", torch.zeros(1, 1, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) + self.count.add_(1))  # a buffer updated on every call


def test_ane_cancel_transposes_does_not_run_in_place_ops_while_rewriting() -> None:
    """Its constant evaluator ran ``count.add_(1)`` on the real buffer during the pass and baked the
    result into a constant, so the graph stopped following the buffer."""
    torch.manual_seed(0)
    x = torch.randn(1, 5, 8)
    model = _Counter().eval()
    reference = copy.deepcopy(model)
    gm = capture(model, (x,)).module()
    runs = 0
    for name in (None, "ane_linear_to_conv", "ane_cancel_transposes"):
        if name is not None:
            assert PASSES[name]().run(PassContext(gm, (x,))) > 0
            gm.graph.eliminate_dead_code()
            gm.recompile()
        annotate(gm, (x,))  # the pipeline runs the graph once after every pass
        runs += 1
    assert torch.equal(gm.count, torch.full((1, 1, 8), float(runs)))  # the graph's runs, none by a pass
    reference.count.copy_(gm.count)
    for _ in range(2):  # and the graph keeps counting like the model
        with torch.no_grad():
            torch.testing.assert_close(gm(x), reference(x), rtol=1e-5, atol=1e-5)


# --- user-code patterns through every default pipeline ---------------------------------------------------


class _ChannelsLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 2, 2), nn.BatchNorm2d(8)
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.bn(self.conv(x)).flatten(2).transpose(1, 2)  # (B, N, C) tokens
        return (t + torch.relu(self.fc(self.norm(t)))).mean(1)


class _InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(8, 8), nn.Linear(8, 8), nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.1, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.fc1(x))
        y += x
        h = self.act(self.fc2(y))
        y[:, 0] = h[:, 0]  # class-token overwrite
        return self.fc2(h) + y


class _RuntimeBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "pos"):  # registered on the first call
            self.register_buffer("pos", torch.linspace(0, 1, x.shape[1] * 8).reshape(1, x.shape[1], 8))
        return self.fc(x + self.pos)


class _TracingBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            x = x * 2
        else:
            x = x + x
        return torch.relu(self.fc(x))


class _Interpolate(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.conv, self.mode = nn.Conv2d(4, 4, 1), mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = {"align_corners": False} if self.mode == "bilinear" else {}
        return self.conv(F.interpolate(x, scale_factor=2, mode=self.mode, **extra))


class _MaskedSoftmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        causal = torch.ones(n, n, dtype=torch.bool).triu(1)
        logits = (q @ k.transpose(-2, -1)).masked_fill(causal, float("-inf"))
        return (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, 8)


class _IntegerPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(16, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pos = torch.arange(x.shape[1]).unsqueeze(0).expand(x.shape[0], -1)  # position ids
        keep = x.abs().sum(-1) > 0.5
        count = keep.sum(-1, keepdim=True)  # sum over a bool mask
        y = self.fc(x + self.emb(pos + 1)) * keep.unsqueeze(-1)
        return y.sum(1) / count.clamp(min=1), count, pos.sum() // 2


_PATTERNS = {
    "channels_last_input": (_ChannelsLast, lambda: (torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last),)),
    "in_place_ops": (_InPlace, lambda: (torch.randn(1, 5, 8),)),
    "buffer_registered_in_forward": (_RuntimeBuffer, lambda: (torch.randn(1, 5, 8),)),
    "tracing_branch": (_TracingBranch, lambda: (torch.randn(1, 5, 8),)),
    "interpolate_bilinear": (lambda: _Interpolate("bilinear"), lambda: (torch.randn(1, 4, 4, 4),)),
    "interpolate_nearest": (lambda: _Interpolate("nearest"), lambda: (torch.randn(1, 4, 4, 4),)),
    "masked_fill_inf_softmax": (_MaskedSoftmax, lambda: (torch.randn(1, 5, 8),)),
    "integer_path": (_IntegerPath, lambda: (torch.randn(2, 5, 8),)),
}
_PIPELINES = [(t.name, a.name) for t in TARGETS.values() for a in t.accelerators]


@pytest.mark.parametrize("target, accelerator", _PIPELINES, ids=[f"{t}-{a}" for t, a in _PIPELINES])
@pytest.mark.parametrize("pattern", list(_PATTERNS))
def test_user_pattern_through_default_pipeline(pattern: str, target: str, accelerator: str) -> None:
    torch.manual_seed(0)
    make_model, make_inputs = _PATTERNS[pattern]
    model, x = make_model().eval(), make_inputs()
    result = _run(model, x, default_pipeline(target, accelerator))
    _same(result, model, x)
    assert result.program is not None  # the rewritten graph is captured again
