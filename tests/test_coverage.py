"""Accelerator coverage (``edgevit inspect``): each checker's verdict on tiny artifacts that break a
rule and on ones that do not, plus the partition counting and the op -> pass map."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from edgevit.errors import EdgevitError
from edgevit.export.backends.coreml.coverage import coreml_coverage
from edgevit.export.backends.onnx.coverage import onnx_ep_coverage
from edgevit.export.backends.openvino.coverage import openvino_coverage
from edgevit.export.backends.tflite import coverage as tflite_cov
from edgevit.export.backends.tflite.coverage import tflite_coverage
from edgevit.export.coverage import Coverage, count_partitions, coverage, fixes_for, render
from edgevit.export.capture import capture
from edgevit.export.passes import PASSES, GraphPass
from edgevit.export.targets import get_target


def _convert(target: str, model: nn.Module, x: torch.Tensor, out: Path, precision: str | None = None) -> Path:
    tgt = get_target(target)
    return tgt.converter_module().convert(capture(model.eval(), (x,)), (x,), out, precision or tgt.default_precision)


def _problem(cov: Coverage, key: str, op: str = "") -> str:
    """The one problem line with this key (and op), so a test fails on a missing or doubled verdict."""
    hits = [p for p in cov.problems if p.startswith(f"{key}: {op}")]
    assert len(hits) == 1, (key, op, cov.problems)
    return hits[0]


def _passes_fixing(key: str) -> set[str]:
    """Registered passes whose ``fixes`` name ``key`` (computed here, not with ``fixes_for``)."""
    return {name for name, cls in PASSES.items() if key.lower() in {f.lower() for f in cls.fixes}}


def _assert_fixes_listed(cov: Coverage) -> None:
    """Every unsupported op / problem key that a registered pass fixes carries exactly those passes."""
    for item in [*cov.unsupported, *cov.problems]:
        key = item.split(": ")[0].removeprefix("ai.onnx:")
        assert set(cov.fixes.get(item, [])) == _passes_fixing(key), item
    assert set(cov.fixes) <= {*cov.unsupported, *cov.problems}


# --- tiny models ---------------------------------------------------------------------------------

class Clean(nn.Module):
    """Linear + last-axis softmax on a batch-1 tensor: every accelerator takes it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).softmax(-1)


class Unfriendly(nn.Module):
    """A rank-5 softmax, GELU, CUMSUM, a BROADCAST_TO to batch 2 and a batch-2 concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x).reshape(1, 4, 2, 2, 8).softmax(-1).reshape(1, 16, 8)
        w = torch.cumsum(F.gelu(y), 1).expand(2, 16, 8)  # stays a BROADCAST_TO: CONCATENATION does not broadcast
        return torch.cat([w, w], 1)


# --- partition counting and the fix map (no backend) -------------------------------------------

def _random_dag(n: int, seed: int) -> tuple[list[set[int]], Any]:
    """A random DAG of ``n`` Relu/Sigmoid/Add nodes in topological order, as producers and as ONNX."""
    from onnx import TensorProto, helper

    rng = random.Random(seed)
    producers: list[set[int]] = []
    nodes = []
    for i in range(n):
        srcs = sorted(set(rng.sample(range(i), k=min(i, rng.choice([1, 1, 2]))))) if i else []
        producers.append(set(srcs))
        ins = [f"v{s}" for s in srcs] or ["x"]
        op = "Add" if len(ins) == 2 else rng.choice(["Relu", "Sigmoid"])
        nodes.append(helper.make_node(op, ins, [f"v{i}"], name=f"n{i}"))
    used = {s for p in producers for s in p}
    outs = [helper.make_tensor_value_info(f"v{i}", TensorProto.FLOAT, [1]) for i in range(n) if i not in used]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], outs)
    return producers, helper.make_model(graph)


@pytest.mark.parametrize("seed", range(6))
def test_count_partitions_agrees_with_onnxruntime(seed: int) -> None:
    """Our partition count is onnxruntime's (its usability checker's algorithm) on random DAGs."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    producers, model = _random_dag(12, seed)
    rng = random.Random(100 + seed)
    for _ in range(20):
        supported = [rng.random() < 0.6 for _ in producers]

        class Checker:  # the op-table checker's interface, answering from ``supported``
            def is_op_supported(self, node):  # noqa: ANN001, ANN201
                return supported[int(node.name[1:])]

            def get_caveats(self):  # noqa: ANN201
                return []

        ort = uc.check_partitioning(model.graph, Checker(), False).num_partitions
        assert count_partitions(producers, supported) == ort, supported


def test_count_partitions_simple_cases() -> None:
    chain = [set(), {0}, {1}, {2}]
    assert count_partitions(chain, [True] * 4) == 1
    assert count_partitions(chain, [True, False, True, True]) == 2
    assert count_partitions(chain, [False] * 4) == 0
    # a diamond whose unsupported middle branch feeds the join: the join cannot share the first group
    diamond = [set(), {0}, {0}, {1, 2}]
    assert count_partitions(diamond, [True, True, False, True]) == 2


def test_fixes_for_matches_ops_and_problem_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    class Fake(GraphPass):
        """Test stand-in."""

        name = "zz_fake_fix"
        fixes = ("Erf", "rank>4", "BROADCAST_TO")

    class Other(GraphPass):
        """Test stand-in that no pipeline wants."""

        name = "zz_other_fix"
        fixes = ("rank>4",)

    monkeypatch.setitem(PASSES, Fake.name, Fake)
    monkeypatch.setitem(PASSES, Other.name, Other)
    assert Fake.name in fixes_for("ai.onnx:Erf")
    assert Fake.name in fixes_for("erf")
    assert Fake.name in fixes_for("rank>4: SOFTMAX x1 (tensor [1, 4, 2, 2, 8])")
    assert Fake.name in fixes_for("broadcast_to")
    assert Fake.name not in fixes_for("rank>5: ai.onnx:Reshape")
    assert Fake.name not in fixes_for("Reshape")
    # in ORDER (passes outside it, like these two, last); with an accelerator, its pipeline's passes first
    from edgevit.export.passes import ORDER, default_pipeline

    names = fixes_for("rank>4")
    assert names == sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
    assert names[-2:] == [Fake.name, Other.name]
    names = fixes_for("rank>4", "tflite", "gpu")
    wanted = [n in default_pipeline("tflite", "gpu") for n in names]
    assert any(wanted) and wanted == sorted(wanted, reverse=True) and names[-2:] == [Fake.name, Other.name]


def test_every_registered_fix_maps_back_to_its_pass() -> None:
    """The map `edgevit inspect` uses: each name in a pass's ``fixes`` finds that pass."""
    for name, cls in PASSES.items():
        for fix in cls.fixes:
            assert name in fixes_for(fix), (name, fix)


def test_gpu_analyzer_warnings_are_attached_to_their_op() -> None:
    report = "\n".join([
        "Subgraph#0 main(T#0) -> [T#3]",
        "  Op#0 FULLY_CONNECTED(T#0, T#1) -> [T#2]",
        "  Op#1 BROADCAST_TO(T#2, T#4) -> [T#3]",
        "GPU COMPATIBILITY WARNING: Not supported op BROADCAST_TO",
        "Subgraph#1 other(T#0) -> [T#1]",
        "  Op#0 CUMSUM(T#0) -> [T#1]",
        "GPU COMPATIBILITY WARNING: ignored, not the main subgraph",
    ])
    assert tflite_cov._parse_gpu_warnings(report) == {1: ["Not supported op BROADCAST_TO"]}


def test_coverage_rejects_unknown_accelerators_and_missing_artifacts(tmp_path: Path) -> None:
    with pytest.raises(EdgevitError, match="no accelerator 'gpu'"):
        coverage(tmp_path / "m.onnx", "onnx", "gpu")
    with pytest.raises(EdgevitError, match="no TFLite model"):
        coverage(tmp_path / "missing.tflite", "tflite", "gpu")


# --- TFLite --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tflite_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("tflite")
    x = torch.randn(1, 16, 8)
    torch.manual_seed(0)
    return {"clean": _convert("tflite", Clean(), x, out / "clean.tflite"),
            "unfriendly": _convert("tflite", Unfriendly(), x, out / "unfriendly.tflite")}


@pytest.mark.slow
def test_tflite_clean_model_is_whole_everywhere(tflite_models: dict[str, Path]) -> None:
    for acc in ("xnnpack", "gpu", "nnapi"):
        cov = coverage(tflite_models["clean"], "tflite", acc)  # the GPU check runs TensorFlow's analyzer
        assert cov.accelerator == f"tflite:{acc}" and cov.whole and cov.notes == [], render(cov)
        assert cov.macs_total == 16 * 8 * 8 and cov.macs_supported == cov.macs_total


@pytest.mark.slow
def test_tflite_gpu_flags_rank5_broadcast_to_and_batch(tflite_models: dict[str, Path]) -> None:
    cov = tflite_coverage(tflite_models["unfriendly"], "gpu")  # with TensorFlow's analyzer
    assert cov.checker.startswith("TFLite analyzer (TF ")
    assert cov.unsupported == {"BROADCAST_TO": 1}, render(cov)  # not in the delegate's op table
    assert "tensor [1, 4, 2, 2, 8]" in _problem(cov, "rank>4", "SOFTMAX")
    assert "tensor [2, 32, 8]" in _problem(cov, "batch>1", "CONCATENATION")  # the model output: a boundary
    # FC | GELU, CUMSUM run: the rank-5 reshape/softmax/reshape island splits them in two
    assert cov.nodes == 8 and cov.supported == 3 and cov.partitions == 2 and not cov.whole
    # TF 2.21's analyzer prints no per-op GPU warning (backends.md 4.7): the note says it disagreed
    assert any("analyzer reported the model GPU-compatible" in n for n in cov.notes), cov.notes
    _assert_fixes_listed(cov)


@pytest.mark.slow
def test_tflite_nnapi_has_no_gelu_and_no_rank5(tflite_models: dict[str, Path]) -> None:
    cov = tflite_coverage(tflite_models["unfriendly"], "nnapi")
    assert cov.unsupported == {"BROADCAST_TO": 1, "CUMSUM": 1, "GELU": 1}, render(cov)
    _problem(cov, "rank>4", "SOFTMAX")
    # FULLY_CONNECTED before the rank-5 reshape, CONCATENATION after BROADCAST_TO (NNAPI has no batch rule)
    assert cov.supported == 2 and cov.partitions == 2
    _assert_fixes_listed(cov)


@pytest.mark.slow
def test_tflite_xnnpack_verdict_comes_from_the_interpreter(tflite_models: dict[str, Path]) -> None:
    cov = tflite_coverage(tflite_models["unfriendly"], "xnnpack")
    assert cov.checker == "LiteRT interpreter (XNNPACK delegate partitions)"
    # the delegate takes FC..GELU and the CONCATENATION; CUMSUM and BROADCAST_TO run on LiteRT's kernels
    assert cov.unsupported == {"BROADCAST_TO": 1, "CUMSUM": 1}, render(cov)
    assert cov.supported == 6 and cov.partitions == 2 and cov.problems == [] and not cov.whole
    assert cov.macs_percent == 100.0


# --- ONNX ----------------------------------------------------------------------------------------

class AttentionLike(nn.Module):
    """softmax over a non-last axis and an activation x activation MatMul on rank-3 tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ x.transpose(1, 2)).softmax(1) @ x


class Rank5(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, 2, 2, 4, 4).softmax(-1).reshape(1, 16, 4) + 1.0


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    return {
        "clean": _convert("onnx", Clean(), torch.randn(1, 8), out / "clean.onnx"),
        "attention": _convert("onnx", AttentionLike(), torch.randn(1, 16, 4), out / "attention.onnx"),
        "rank5": _convert("onnx", Rank5(), torch.randn(1, 16, 4), out / "rank5.onnx"),
    }


@pytest.mark.slow
def test_onnx_xnnpack_ep_takes_gemm_and_last_axis_softmax(onnx_models: dict[str, Path]) -> None:
    cov = onnx_ep_coverage(onnx_models["clean"], "xnnpack")
    assert cov.unsupported == {} and cov.whole, render(cov)  # Gemm (2-D, constant B) + Softmax
    assert cov.macs_total == 8 * 8 and cov.macs_percent == 100.0


@pytest.mark.slow
def test_onnx_xnnpack_ep_rejects_axis1_softmax_and_rank3_matmul(onnx_models: dict[str, Path]) -> None:
    cov = onnx_ep_coverage(onnx_models["attention"], "xnnpack")
    assert "axis 1" in _problem(cov, "softmax axis", "Softmax")
    assert _problem(cov, "xnnpack ep matmul", "MatMul").startswith("xnnpack ep matmul: MatMul x2")
    assert cov.supported == 0 and cov.macs_total == 2 * 16 * 16 * 4 and cov.macs_supported == 0
    _assert_fixes_listed(cov)


@pytest.mark.slow
def test_onnx_nnapi_rank5_is_a_problem_and_coreml_takes_it(onnx_models: dict[str, Path]) -> None:
    nnapi = onnx_ep_coverage(onnx_models["rank5"], "nnapi")
    assert any(p.startswith("rank>4: ai.onnx:Softmax") for p in nnapi.problems), nnapi.problems
    assert not nnapi.whole and nnapi.supported < nnapi.nodes
    _assert_fixes_listed(nnapi)
    coreml = onnx_ep_coverage(onnx_models["rank5"], "coreml")  # Core ML's limit is 5
    assert coreml.whole, render(coreml)
    assert coverage(onnx_models["rank5"], "onnx", "cpu").whole


# --- Core ML / ANE -------------------------------------------------------------------------------

class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class AneUnfriendly(nn.Module):
    """A gather, a dilated convolution, a stride-3 max pool and a x4 upsample."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.register_buffer("idx", torch.tensor([3, 0, 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool2d(self.conv(x), 3, 3)  # 12x12 -> 4x4
        y = F.interpolate(y, scale_factor=4.0, mode="nearest")
        return torch.index_select(y, 1, self.idx)


@pytest.fixture(scope="module")
def coreml_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("coreml")
    torch.manual_seed(0)
    x = torch.randn(1, 4, 12, 12)
    return {
        "clean": _convert("coreml", ConvNet(), x, out / "clean.mlpackage", "fp16"),
        "fp32": _convert("coreml", ConvNet(), x, out / "fp32.mlpackage", "fp32"),
        "unfriendly": _convert("coreml", AneUnfriendly(), x, out / "unfriendly.mlpackage", "fp16"),
    }


@pytest.mark.slow
def test_ane_clean_fp16_program_is_whole(coreml_models: dict[str, Path]) -> None:
    cov = coverage(coreml_models["clean"], "coreml")  # the default (only) accelerator: ane
    assert cov.accelerator == "coreml:ane" and cov.whole, render(cov)
    assert cov.macs_total == 8 * 12 * 12 * 4 and cov.macs_percent == 100.0
    assert any(n.startswith("compute plan: needs macOS") for n in cov.notes)


@pytest.mark.slow
def test_ane_fp32_program_runs_nothing_on_the_ane(coreml_models: dict[str, Path]) -> None:
    cov = coreml_coverage(coreml_models["fp32"])
    assert cov.supported == 0 and cov.partitions == 0, render(cov)
    assert cov.problems == [p for p in cov.problems if p.startswith("fp32 program")] and len(cov.problems) == 1


@pytest.mark.slow
def test_ane_flags_gather_dilation_pool_stride_and_upsample(coreml_models: dict[str, Path]) -> None:
    cov = coreml_coverage(coreml_models["unfriendly"])
    assert cov.unsupported.get("gather") == 1, render(cov)
    _problem(cov, "dilated conv", "conv")
    assert "strides [3, 3]" in _problem(cov, "pool kernel>13 or stride>2", "max_pool")
    assert "scale 4" in _problem(cov, "upsample scale>2")
    assert cov.supported == cov.nodes - 4 and not cov.whole
    _assert_fixes_listed(cov)


# --- OpenVINO ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def openvino_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import openvino as ov

    out = tmp_path_factory.mktemp("openvino")
    torch.manual_seed(0)
    x = torch.randn(1, 16, 8)
    static = _convert("openvino", Clean(), x, out / "static.xml", "fp32")  # the converter pins shapes
    model = ov.Core().read_model(str(static))
    model.reshape([-1, -1, -1])  # what a dynamic-shape IR (e.g. from other tools) looks like
    ov.save_model(model, str(out / "dynamic.xml"), compress_to_fp16=False)
    return {"dynamic": out / "dynamic.xml", "static": static}


@pytest.mark.slow
def test_openvino_cpu_query_model_takes_everything(openvino_models: dict[str, Path]) -> None:
    cov = coverage(openvino_models["dynamic"], "openvino", "cpu")
    assert cov.checker == "OpenVINO Core.query_model(CPU)"
    assert cov.whole and cov.nodes >= 3, render(cov)
    static = openvino_coverage(openvino_models["static"], "cpu")
    assert static.macs_total == 16 * 8 * 8 and static.macs_percent == 100.0


@pytest.mark.slow
def test_openvino_npu_needs_static_shapes(openvino_models: dict[str, Path]) -> None:
    dynamic = openvino_coverage(openvino_models["dynamic"], "npu")
    assert any(p.startswith("device absent: no NPU") for p in dynamic.problems)
    # an IR with dynamic dims (x [?,?,?]): the NPU would refuse it
    assert any(p.startswith("dynamic shape: inputs x") for p in dynamic.problems), dynamic.problems
    assert dynamic.supported < dynamic.nodes
    static = openvino_coverage(openvino_models["static"], "npu")
    assert [p.split(":")[0] for p in static.problems] == ["device absent"], static.problems
    assert static.supported == static.nodes


def test_coverage_fields_serialise() -> None:
    cov = Coverage("x:y", "c", nodes=4, supported=3, partitions=2, unsupported={"A": 1}, supported_ops={"B": 3},
                   macs_total=10, macs_supported=5)
    d = cov.to_dict()
    assert d["percent"] == 75.0 and d["macs_percent"] == 50.0 and d["whole"] is False
    assert json.loads(json.dumps(d))["supported_ops"] == {"B": 3}
    assert Coverage("x:y", "c", 1, 1, 1).supported_ops == {}
    assert Coverage("x:y", "c", 1, 1, 1, macs_total=0, macs_supported=0).macs_percent is None
    lines = render(cov).splitlines()
    assert lines[1].strip().startswith("partitions 2; nodes 3/4 (75.0%); MACs 50.0%")
    assert lines[2].strip() == f"unsupported A x1 -> {', '.join(fixes_for('A')) or 'no pass yet'}"
    assert len(lines) == 3  # the ops on the accelerator are data for --json and the lock file, not report lines
