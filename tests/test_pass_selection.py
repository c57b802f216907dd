"""static_gather_scatter and static_topk_select: equivalence, and the EP partitions they remove."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edgevit.export.backends.onnx.coverage import onnx_ep_coverage
from edgevit.export.capture import capture
from edgevit.export.passes import run_pipeline
from edgevit.export.targets import get_target
from edgevit.models.filtervit import FilterAttention, RandomAttention

_SELECTION_OPS = ("topk", "gather", "scatter", "index_select", "index.Tensor")
_ONNX_SELECTION = {"TopK", "GatherElements", "ScatterElements", "Gather", "GatherND", "Expand"}


def _ops(program: torch.export.ExportedProgram) -> list[str]:
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]


def _selection_ops(program: torch.export.ExportedProgram) -> list[str]:
    return [op for op in _ops(program) if any(s in op for s in _SELECTION_OPS)]


def _clip_bounds(path: Path) -> list[tuple[float, float]]:
    """[min, max] of every ONNX Clip (inputs 1, 2 from initializers or Constant nodes)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    values = {i.name: float(numpy_helper.to_array(i)) for i in model.graph.initializer if not i.dims}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute[0].t.dims == []:
            values[n.output[0]] = float(numpy_helper.to_array(n.attribute[0].t))
    return [(values[n.input[1]], values[n.input[2]]) for n in model.graph.node if n.op_type == "Clip"]


def _equal(got: object, want: object) -> bool:
    if isinstance(got, torch.Tensor):
        return torch.equal(got, want)
    return all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


# --- models -------------------------------------------------------------------------------------------------


class _FixedSelect(nn.Module):
    """DropoutViT's eval path: a fixed index buffer, gather (B, C, N) → linear → scatter back."""

    def __init__(self, c: int, n: int, index: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(c, c)
        self.register_buffer("index", index)
        self.register_buffer("position", torch.randn(n, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _ = x.shape
        idx = self.index.unsqueeze(0).expand(b, -1).unsqueeze(1).expand(-1, c, -1)
        tokens = x.gather(2, idx).transpose(1, 2) + self.position.index_select(0, self.index)
        return x.scatter(2, idx, self.lin(tokens).transpose(1, 2))


class _FixedOther(nn.Module):
    """Other constant-index forms: gather along dim 1 of (B, N, C), x[:, idx], scatter of a value, dim 0."""

    def __init__(self, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, _, c = x.shape
        idx = self.index.view(1, -1, 1).expand(b, -1, c)
        return (x.gather(1, idx), x[:, self.index], x.scatter(1, idx, -2.5), x.index_select(0, self.index[:1] % b),
                x.permute(1, 0, 2).index_select(0, self.index))


class _TopkSelect(nn.Module):
    """FilterViT's selection: top-K of a flattened score map, gather, transform, scatter back."""

    def __init__(self, c: int, n: int, k: int, largest: bool = True) -> None:
        super().__init__()
        self.k, self.largest = k, largest
        self.score = nn.Conv2d(c, 1, 3, padding=1)
        self.lin = nn.Linear(c, c)
        self.register_buffer("position", torch.randn(n, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        score = self.score(x).sigmoid()
        index = score.flatten(1).topk(self.k, dim=1, largest=self.largest).indices
        flat = (x * score).flatten(2)
        index_c = index.unsqueeze(1).expand(-1, c, -1)
        tokens = flat.gather(2, index_c).transpose(1, 2)
        tokens = tokens + self.position.index_select(0, index.reshape(-1)).reshape(b, -1, c)
        return flat.scatter(2, index_c, self.lin(tokens).transpose(1, 2)).reshape(b, c, h, w)


class _TopkTokens(nn.Module):
    """Token pruning on (B, N, C): values, gather along dim 1, x[idx], scatter of src and of a value."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values, index = x.sum(-1).topk(self.k)
        index_c = index.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        kept = torch.gather(x, 1, index_c)
        return (values, kept, table[index], x.scatter(1, index_c, kept * values.unsqueeze(-1)),
                x.scatter(1, index_c, 4.0))


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...], name: str) -> object:
    return run_pipeline(model.eval(), inputs, [name])


# --- static_gather_scatter ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("b", "c", "n", "k", "sorted_runs"), [
    (1, 8, 49, 12, False), (2, 5, 30, 29, False), (3, 4, 64, 16, True), (1, 6, 20, 20, True)])
def test_static_gather_scatter_is_exact(b: int, c: int, n: int, k: int, sorted_runs: bool) -> None:
    g = torch.Generator().manual_seed(n + k)
    index = torch.randperm(n, generator=g)[:k]
    if sorted_runs:  # a few contiguous runs: the slice + cat form
        index = torch.cat([torch.arange(n - k // 2, n), torch.arange(n - k, n - k // 2)])
    model = _FixedSelect(c, n, index).eval()
    x = torch.randn(b, c, n)
    result = _run(model, (x,), "static_gather_scatter")
    assert result.reports[0].sites == 3  # gather, scatter, and the folded constant-table read
    assert _selection_ops(result.program) == []
    if not sorted_runs:
        assert "aten.matmul.default" in _ops(result.program)
    y = torch.randn(b, c, n)
    assert torch.equal(result.program.module()(y), model(y))


@pytest.mark.parametrize(("b", "n", "c", "index"), [
    (2, 9, 3, [8, 0, 3, 5, 1, 7, 2, 6, 4]), (3, 40, 4, list(range(0, 40, 3))), (1, 16, 5, [4, 5, 6, 11, 12])])
def test_static_gather_scatter_other_forms_are_exact(b: int, n: int, c: int, index: list[int]) -> None:
    model = _FixedOther(torch.tensor(index))
    x = torch.randn(b, n, c)
    result = _run(model, (x,), "static_gather_scatter")
    assert result.reports[0].sites == 5
    assert _selection_ops(result.program) == []
    y = torch.randn(b, n, c)
    assert _equal(result.program.module()(y), model(y))


class _Unprovable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("per_batch", torch.tensor([[[0, 2]], [[1, 3]]]).expand(2, 3, 2).contiguous())
        self.register_buffer("repeated", torch.tensor([1, 1]).view(1, 1, 2).expand(2, 3, 2).contiguous())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.gather(2, self.per_batch), x.scatter(2, self.repeated, torch.ones(2, 3, 2))


def test_static_gather_scatter_leaves_unprovable_sites() -> None:
    """Indices that differ per batch row, and a scatter with duplicate indices (unspecified result)."""
    x = torch.randn(2, 3, 4)
    result = _run(_Unprovable(), (x,), "static_gather_scatter")
    assert result.reports[0].sites == 0


@pytest.mark.slow
def test_static_gather_scatter_reason_ort_eps(tmp_path: Path) -> None:
    """GatherElements / ScatterElements are in neither EP list: the DropoutViT block splits the graph."""
    model = _FixedSelect(8, 49, torch.randperm(49, generator=torch.Generator().manual_seed(0))[:16]).eval()
    x = torch.randn(1, 8, 49)
    convert = get_target("onnx").converter_module().convert
    convert(capture(model, (x,)), (x,), tmp_path / "before.onnx", "fp32")
    result = _run(model, (x,), "static_gather_scatter")
    convert(result.program, (x,), tmp_path / "after.onnx", "fp32")
    for accelerator in ("nnapi", "coreml"):
        before = onnx_ep_coverage(tmp_path / "before.onnx", accelerator)
        assert {"GatherElements", "ScatterElements"} <= set(before.unsupported) and not before.whole, before
        after = onnx_ep_coverage(tmp_path / "after.onnx", accelerator)
        assert after.unsupported == {} and after.whole, after


@pytest.mark.slow
def test_static_gather_scatter_on_zoo_dropoutvit_block() -> None:
    """The zoo's DropoutViT attention (fixed eval pixel set) on a 28x28 map: no gather/scatter left, exact."""
    block = RandomAttention(16, 2, 28, torch.Generator().manual_seed(0)).eval()
    x = torch.randn(1, 16, 28, 28)
    result = _run(block, (x,), "static_gather_scatter")
    assert result.reports[0].sites == 3
    assert _selection_ops(result.program) == []
    y = torch.randn(1, 16, 28, 28)
    assert torch.equal(result.program.module()(y), block(y))


# --- static_topk_select ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("b", "c", "side", "k", "largest"), [
    (1, 8, 7, 5, True), (2, 4, 6, 36, True), (3, 6, 5, 9, False),
    pytest.param(1, 4, 48, 300, True, marks=pytest.mark.slow)])  # 48^2 > 1024: the digit tie-break
def test_static_topk_select_is_exact(b: int, c: int, side: int, k: int, largest: bool) -> None:
    torch.manual_seed(side * 10 + k)
    model = _TopkSelect(c, side * side, k, largest).eval()
    x = torch.randn(b, c, side, side)
    result = _run(model, (x,), "static_topk_select")
    assert result.reports[0].sites == 1
    assert _selection_ops(result.program) == []
    for _ in range(3):  # random scores: no ties (a tie in the top-k makes PyTorch's own order arbitrary)
        y = torch.randn(b, c, side, side)
        assert torch.equal(result.program.module()(y), model(y))


@pytest.mark.parametrize(("b", "n", "c", "k"), [(1, 10, 3, 1), (2, 30, 6, 7), (2, 50, 4, 50)])
def test_static_topk_select_token_forms_are_exact(b: int, n: int, c: int, k: int) -> None:
    model = _TopkTokens(k)
    x, table = torch.randn(b, n, c), torch.randn(n, 5)
    result = run_pipeline(model, (x, table), ["static_topk_select"])
    assert result.reports[0].sites == 1
    assert _selection_ops(result.program) == []
    y = torch.randn(b, n, c)
    assert _equal(result.program.module()(y, table), model(y, table))


class _TopkPositions(nn.Module):
    """Values and the gathered (position digit) pairs of the top-k: which indices were picked."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, scores: torch.Tensor, digits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, index = scores.topk(self.k)
        return values, digits.gather(1, index.unsqueeze(-1).expand(-1, -1, 2))


@pytest.mark.parametrize(("n", "k", "dtype"), [
    (1000, 100, torch.float32), (700, 64, torch.float16),
    pytest.param(3025, 256, torch.float16, marks=pytest.mark.slow), (1500, 1024, torch.float16)])
def test_static_topk_select_ties_pick_lower_index(n: int, k: int, dtype: torch.dtype) -> None:
    """Tied scores (quantised to 1/64): a valid top-k, unique indices, ties in index order.

    In fp16 the rewritten graph runs in half precision, as on a Core ML / NNAPI-fp16 device: the index
    tie-break must stay exact above 2048 (two base-64 digits) and the ranks below 2048.
    """
    torch.manual_seed(n)
    scores = (torch.rand(2, n) * 64).round() / 64
    digits = torch.stack([torch.arange(n) % 1024, torch.arange(n) // 1024], -1).float().expand(2, n, 2).contiguous()
    result = run_pipeline(_TopkPositions(k), (torch.randn(2, n), digits), ["static_topk_select"])
    assert result.reports[0].sites == 1
    got_values, got_digits = result.model.to(dtype)(scores.to(dtype), digits.to(dtype))
    want = scores.to(dtype).float().topk(k)
    index = (got_digits[..., 0].float() + 1024 * got_digits[..., 1].float()).long()
    assert torch.equal(got_values.float(), want.values)
    assert torch.equal(scores.to(dtype).float().gather(1, index), want.values)  # unique & a valid top-k
    assert all(len(set(row.tolist())) == k for row in index)
    in_order = (index[:, 1:] > index[:, :-1]) | (want.values[:, 1:] < want.values[:, :-1])
    assert bool(in_order.all()), "ties must come out in index order"


class _TopkLeftAlone(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        unsorted = x.topk(3, sorted=False).indices
        other_dim = x.topk(2, dim=0).indices
        as_numbers = x.topk(3).indices.float() * 2  # index arithmetic: not a selection
        return x.gather(1, unsorted), x.gather(0, other_dim), as_numbers


def test_static_topk_select_leaves_other_uses() -> None:
    result = _run(_TopkLeftAlone(), (torch.randn(4, 9),), "static_topk_select")
    assert result.reports[0].sites == 0


@pytest.mark.slow
def test_static_topk_select_on_zoo_filtervit_block() -> None:
    """The zoo's FilterViT attention (score CNN, top-128 of a 28x28 map): selection gone, exact."""
    torch.manual_seed(0)
    block = FilterAttention(16, 2, 28).eval()
    x = torch.randn(1, 16, 28, 28)
    result = _run(block, (x,), "static_topk_select")
    assert result.reports[0].sites == 1
    assert _selection_ops(result.program) == []
    y = torch.randn(1, 16, 28, 28)
    top = block.scores(y).flatten(1).topk(block.num_tokens + 1).values
    assert len(set(top[0].tolist())) == block.num_tokens + 1  # no tie: PyTorch's order is then unique
    assert torch.equal(result.program.module()(y), block(y))


@pytest.mark.slow
def test_static_topk_select_reason_ort_eps(tmp_path: Path) -> None:
    """TopK, GatherElements, ScatterElements (and the indices' Expand) are in neither EP list."""
    torch.manual_seed(0)
    model = _TopkSelect(8, 49, 12).eval()
    x = torch.randn(1, 8, 7, 7)
    convert = get_target("onnx").converter_module().convert
    convert(capture(model, (x,)), (x,), tmp_path / "before.onnx", "fp32")
    result = _run(model, (x,), "static_topk_select")
    convert(result.program, (x,), tmp_path / "after.onnx", "fp32")
    for accelerator in ("nnapi", "coreml"):
        before = onnx_ep_coverage(tmp_path / "before.onnx", accelerator)
        assert {"TopK", "GatherElements", "ScatterElements"} <= set(before.unsupported), before
        assert not before.whole
        after = onnx_ep_coverage(tmp_path / "after.onnx", accelerator)
        assert after.unsupported == {} and after.whole, after
    # The checker only reads the op list; the NNAPI EP itself takes Clip only as RELU1 or RELU6
    # (clip_op_support_checker.cc), so the rank's sign step must stay a [-1, 1] Clip in the file.
    bounds = _clip_bounds(tmp_path / "after.onnx")
    assert bounds and all(b in ((-1.0, 1.0), (0.0, 6.0)) for b in bounds), bounds


@pytest.mark.slow
@pytest.mark.parametrize(("target", "suffix", "precision"), [("tflite", "tflite", "fp32"),
                                                             ("coreml", "mlpackage", "fp16")])
def test_static_topk_select_converts(tmp_path: Path, target: str, suffix: str, precision: str) -> None:
    """The rewritten selection (Sub/Mul/Add/Clip/Relu/MatMul/Reshape) converts to TFLite and Core ML."""
    torch.manual_seed(0)
    model = _TopkSelect(8, 49, 12).eval()
    x = torch.randn(1, 8, 7, 7)
    result = _run(model, (x,), "static_topk_select")
    out = get_target(target).converter_module().convert(result.program, (x,), tmp_path / f"m.{suffix}", precision)
    assert Path(out).exists()
