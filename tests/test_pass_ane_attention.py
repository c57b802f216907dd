"""ane_split_heads: batched attention → Apple's per-head einsums with the softmax on dim 1.

The reference (the captured batched attention) and the rewrite side by side with a numerical
equivalence test (fp32 re-association, and exact to ~1e-15 in float64); the reason is shown on the
converted MIL program: per-head ``einsum`` ops on rank-4 (B, S, 1, S) maps whose softmax runs over
axis 1, where the batched form has one softmax over the last axis of (B, H, S, S). Core ML prediction
cannot run on Linux, so the ANE latency benefit is Apple's published claim, not measured here.
deit_tiny's Core ML export (12 sites, no batched softmax left in its MIL program) is checked in
test_export_matrix.py, which converts it anyway.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from torch import nn

from edgevit.export.backends.coreml.passes.ane_split_heads import OUTPUT_EQUATION, SCORES_EQUATION
from edgevit.export.passes import default_pipeline, run_pipeline

SPLIT = ["strip_aliases", "lower_rank", "ane_split_heads"]


def count(program: torch.export.ExportedProgram) -> collections.Counter:
    return collections.Counter(str(n.target).replace("aten.", "") for n in program.graph.nodes
                               if n.op == "call_function")


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def run64(module: nn.Module, *xs: torch.Tensor) -> torch.Tensor:
    import copy
    with torch.no_grad():
        return copy.deepcopy(module).double()(*(x.double() for x in xs))


class Attention(nn.Module):
    """Multi-head attention spelled the timm way, with the extras the pass must carry per head."""

    def __init__(self, dim: int = 48, heads: int = 3, tokens: int = 10, bias: str | None = None,
                 mask: bool = False, divide: bool = False):
        super().__init__()
        self.heads, self.mask, self.divide = heads, mask, divide
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        shapes = {"per_head": (heads, tokens, tokens), "shared": (tokens, tokens), "keys": (1, 1, 1, tokens)}
        self.bias = nn.Parameter(torch.randn(shapes[bias])) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        d = c // self.heads
        a = q @ k.transpose(-2, -1)
        a = a / d ** 0.5 if self.divide else a * d ** -0.5
        if self.bias is not None:
            a = self.bias + a  # the chain operand second: add is commutative
        if self.mask:
            a = a.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -1e4)
        a = a.softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    """Queries and keys of different lengths and a value width != the key width (DETR decoder shape)."""

    def __init__(self, heads: int = 4):
        super().__init__()
        self.heads = heads

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        split = [t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v)]
        a = (split[0] @ split[1].transpose(-2, -1) * 0.3).softmax(dim=3)
        return (a @ split[2]).transpose(1, 2).flatten(2)


# --- equivalence --------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [dict(), dict(heads=1), dict(heads=6, dim=96), dict(bias="per_head"),
                                 dict(bias="shared", divide=True), dict(bias="keys"), dict(mask=True)])
@pytest.mark.parametrize("batch", [1, 2])
def test_split_heads_is_equivalent(cfg: dict, batch: int) -> None:
    torch.manual_seed(0)
    model, x = Attention(**cfg).eval(), torch.randn(batch, 10, cfg.get("dim", 48))
    r = run_pipeline(model, (x,), SPLIT)
    heads = cfg.get("heads", 3)
    assert r.reports[-1].sites == 1
    after = count(r.program)
    assert after["matmul.default"] == 0 and after["einsum.default"] == 2 * heads
    softmaxes = [n for n in r.program.graph.nodes if str(n.target) == "aten.softmax.int"]
    assert len(softmaxes) == heads
    for node in softmaxes:  # (B, Sk, 1, Sq), over the key axis 1
        assert node.args[1] == 1 and tuple(node.meta["val"].shape) == (batch, 10, 1, 10)
    with torch.no_grad():
        assert max_rel(r.model(x), model(x)) <= 1e-5  # fp32: einsum sums the same products in its own order
    assert max_rel(run64(r.model, x), run64(model, x)) < 1e-12


def test_split_heads_cross_attention_with_other_value_width() -> None:
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 12, 32), torch.randn(2, 12, 64)
    model = CrossAttention(heads=4).eval()
    r = run_pipeline(model, (q, k, v), SPLIT)
    assert r.reports[-1].sites == 1 and count(r.program)["einsum.default"] == 8
    with torch.no_grad():
        assert max_rel(r.model(q, k, v), model(q, k, v)) <= 1e-5
    assert max_rel(run64(r.model, q, k, v), run64(model, q, k, v)) < 1e-12


def test_split_heads_emits_apples_equations() -> None:
    model, x = Attention().eval(), torch.randn(1, 10, 48)
    r = run_pipeline(model, (x,), SPLIT)
    equations = [n.args[0] for n in r.program.graph.nodes if str(n.target) == "aten.einsum.default"]
    assert equations == [SCORES_EQUATION, OUTPUT_EQUATION] * 3
    assert (SCORES_EQUATION, OUTPUT_EQUATION) == ("bchq,bkhc->bkhq", "bkhq,bchk->bchq")


# --- what it leaves alone -----------------------------------------------------------------------

class ReAttention(nn.Module):
    """DeepViT: the heads are mixed after the softmax, so per-head chunks would be wrong."""

    def __init__(self, heads: int = 3):
        super().__init__()
        self.mix = nn.Conv2d(heads, heads, 1)

    def forward(self, q, k, v):
        return self.mix((q @ k.transpose(-2, -1)).softmax(-1)) @ v


class Rank3(nn.Module):
    """EfficientViT's cascaded group attention is one head at a time already, on rank-3 tensors."""

    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


class QueryAxisSoftmax(nn.Module):
    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1)).softmax(-2) @ v


@pytest.mark.parametrize("module, shape", [(ReAttention(), (1, 3, 8, 4)), (Rank3(), (3, 8, 4)),
                                           (QueryAxisSoftmax(), (1, 3, 8, 4))])
def test_split_heads_leaves_other_attention_alone(module: nn.Module, shape: tuple) -> None:
    xs = tuple(torch.randn(shape) for _ in range(3))
    r = run_pipeline(module.eval(), xs, ["ane_split_heads"])
    assert r.reports[0].sites == 0 and count(r.program)["einsum.default"] == 0


def test_split_heads_sits_between_the_layout_passes_of_the_coreml_pipeline() -> None:
    pipe = list(default_pipeline("coreml", "ane"))
    assert pipe.index("ane_linear_to_conv") < pipe.index("ane_split_heads") < pipe.index("ane_cancel_transposes")
    for target, acc in [("onnx", "coreml"), ("tflite", "gpu"), ("openvino", "npu")]:
        assert "ane_split_heads" not in default_pipeline(target, acc)


def test_coreml_pipeline_reads_each_head_straight_from_the_qkv_conv() -> None:
    """With the whole coreml:ane pipeline each head's q and v are channel slices of the (B, 3C, 1, S)
    projection conv, k is one slice + transpose (Apple's ``k.transpose(1, 3)``), and the heads are
    concatenated straight into the output conv: no reshape of the token tensor is left."""
    torch.manual_seed(2)
    model, x = Attention(bias="per_head").eval(), torch.randn(1, 10, 48)
    r = run_pipeline(model, (x,), list(default_pipeline("coreml", "ane")))
    nodes = {n.name: n for n in r.program.graph.nodes}
    convs = [n for n in nodes.values() if str(n.target) == "aten.conv2d.default"]
    qkv, proj = sorted(convs, key=lambda n: -n.meta["val"].shape[1])
    assert collections.Counter(str(u.target) for u in qkv.users) == {"aten.slice.Tensor": 9}
    assert str(proj.args[0].target) == "aten.cat.default"
    for einsum in (n for n in nodes.values() if n.args and n.args[0] == SCORES_EQUATION):
        q_h, k_h = einsum.args[1]
        assert q_h.args[0] is qkv and str(k_h.target) == "aten.transpose.int" and k_h.args[0].args[0] is qkv
    with torch.no_grad():
        assert max_rel(r.model(x), model(x)) <= 1e-5


# --- the reason: the Core ML program --------------------------------------------------------------

def mil_attention_ops(path: Path) -> list[tuple[str, tuple, object]]:
    """(op type, output shape, softmax axis) of the softmax / matmul / einsum ops in the MIL program."""
    import coremltools as ct

    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    block = next(iter(spec.mlProgram.functions["main"].block_specializations.values()))
    consts = {op.outputs[0].name: op.attributes["val"].immediateValue.tensor for op in block.operations
              if op.type == "const"}
    found = []
    for op in block.operations:
        if op.type not in ("softmax", "matmul", "einsum"):
            continue
        shape = tuple(d.constant.size for d in op.outputs[0].type.tensorType.dimensions)
        axis = None
        if op.type == "softmax":
            arg = op.inputs["axis"].arguments[0]
            axis = consts[arg.name].ints.values[0] if arg.name else arg.value.immediateValue.tensor.ints.values[0]
        found.append((op.type, shape, axis))
    return found


@pytest.mark.slow
def test_coreml_program_has_per_head_einsums_with_channel_softmax(tmp_path: Path) -> None:
    pytest.importorskip("coremltools")
    from edgevit.export.targets import get_target

    torch.manual_seed(5)
    model, x = Attention(bias="per_head").eval(), torch.randn(1, 10, 48)
    pipe = list(default_pipeline("coreml", "ane"))
    convert = get_target("coreml").converter_module().convert
    ops = {}
    for label, names in (("without", [p for p in pipe if p != "ane_split_heads"]), ("with", pipe)):
        convert(run_pipeline(model, (x,), names).program, (x,), tmp_path / f"{label}.mlpackage", "fp16")
        ops[label] = collections.Counter(mil_attention_ops(tmp_path / f"{label}.mlpackage"))
    # batched: two rank-4 matmuls over (1, 3, ...) and one softmax over the last axis of (1, 3, 10, 10)
    assert ops["without"] == {("matmul", (1, 3, 10, 10), None): 1, ("softmax", (1, 3, 10, 10), -1): 1,
                              ("matmul", (1, 3, 10, 16), None): 1}
    # per head: Apple's einsums and a softmax over axis 1 of the (B, Sk, 1, Sq) map, three times
    assert ops["with"] == {("einsum", (1, 10, 1, 10), None): 3, ("softmax", (1, 10, 1, 10), 1): 3,
                           ("einsum", (1, 16, 1, 10), None): 3}
    # edgevit inspect names the pattern and the pass for the batched program only
    from edgevit.export.backends.coreml.coverage import coreml_coverage

    hints = {label: [n for n in coreml_coverage(tmp_path / f"{label}.mlpackage").notes if "batched" in n]
             for label in ("without", "with")}
    assert hints["with"] == [] and len(hints["without"]) == 1
    assert "1 softmax" in hints["without"][0] and "ane_split_heads" in hints["without"][0]

