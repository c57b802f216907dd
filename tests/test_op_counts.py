"""Op counts per type (``export.coverage.op_counts``) and the ops on an accelerator per type
(``Coverage.supported_ops``): the counts cover exactly the nodes each accelerator's checker counts
(``Coverage.nodes``), ``supported_ops`` exactly those it takes (``Coverage.supported``), under the same type
names; a node refused by a rule rather than by its op type is in neither ``supported_ops`` nor ``unsupported``;
and the counts of a tiny seeded ViT follow from its layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import pytest
import torch
from torch import nn

from edgevit.errors import EdgevitError
from edgevit.export.capture import capture
from edgevit.export.coverage import Coverage, count_by_type, coverage, op_counts
from edgevit.export.targets import Target, get_target

DEPTH = 2

# per target: the op types (summed) that a kind of layer becomes in the artifact, in every accelerator's view.
# "matmul" is every Linear plus the two activation x activation matmuls of each attention block; ONNX writes a
# Linear as MatMul (+ Add) or Gemm depending on its input's rank and onnxruntime's fusions, hence the sum.
_LAYER_OPS: dict[str, dict[str, tuple[str, ...]]] = {
    "onnx": {"matmul": ("MatMul", "Gemm"), "conv": ("Conv",), "norm": ("LayerNormalization",),
             "softmax": ("Softmax",)},
    "tflite": {"linear": ("FULLY_CONNECTED",), "attention": ("BATCH_MATMUL",), "conv": ("CONV_2D",),
               "softmax": ("SOFTMAX",)},
    "openvino": {"matmul": ("MatMul",), "conv": ("Convolution",), "norm": ("MVN",), "softmax": ("Softmax",)},
    "coreml": {"linear": ("linear",), "attention": ("matmul",), "conv": ("conv",), "norm": ("layer_norm",),
               "softmax": ("softmax",)},
}
_SUFFIX = {"onnx": "m.onnx", "tflite": "m.tflite", "openvino": "m.xml", "coreml": "m.mlpackage"}


@pytest.fixture(scope="module")
def vit(seeded_vit: Callable[..., nn.Module], torch_one_thread: None) -> tuple[nn.Module, torch.Tensor]:
    """A 2-block ViT of width 16 with explicit (qkv) attention, and a seeded 16x16 image."""
    model = seeded_vit(dim=16, depth=DEPTH, heads=2, attention="qkv")
    return model, torch.randn(1, 3, 16, 16)


@pytest.fixture(scope="module")
def convert(vit: tuple[nn.Module, torch.Tensor], tmp_path_factory: pytest.TempPathFactory
            ) -> Callable[..., Path]:
    """``convert(target, precision=None)``: the ViT converted (no passes) to ``target`` at ``precision`` (default:
    the target's), once per pair; a skip when one of the target's packages is not installed."""
    done: dict[tuple[str, str], Path] = {}

    def run(target: str, precision: str | None = None) -> Path:
        tgt = _require(target)
        precision = precision or tgt.default_precision
        if (target, precision) not in done:
            model, x = vit
            out = tmp_path_factory.mktemp(f"{target}-{precision}") / _SUFFIX[target]
            done[target, precision] = tgt.converter_module().convert(capture(model, (x,)), (x,), out, precision)
        return done[target, precision]

    return run


@pytest.fixture(scope="module", params=list(_SUFFIX))
def artifact(request: pytest.FixtureRequest, convert: Callable[..., Path]) -> tuple[str, Path]:
    """The ViT converted (no passes) to each target whose packages are installed, at its default precision."""
    return request.param, convert(request.param)


def _require(target: str) -> Target:
    """The target row, or a skip when one of its packages is not installed."""
    tgt = get_target(target)
    for package in tgt.requires:
        pytest.importorskip(package)
    return tgt


def _expected_layers(model: nn.Module) -> dict[str, int]:
    """How many of each kind of layer the model has, counted on the PyTorch module."""
    kinds = [type(m) for m in model.modules()]
    linear, attention = kinds.count(nn.Linear), 2 * DEPTH  # q @ k^T and attn @ v in each block
    return {"matmul": linear + attention, "linear": linear, "attention": attention, "conv": kinds.count(nn.Conv2d),
            "norm": kinds.count(nn.LayerNorm), "softmax": DEPTH}


def _assert_supported_ops_fit(counts: dict[str, int], cov: Coverage) -> None:
    """``supported_ops`` sums to ``supported``; per type it is within the counts, and what it leaves of them
    holds at least the type's ``unsupported`` nodes (a rule's refusals are the rest)."""
    ops = cov.supported_ops
    what = (cov.accelerator, counts, ops, cov.unsupported)
    assert sum(ops.values()) == cov.supported, what
    assert list(ops) == sorted(ops) and all(n > 0 for n in ops.values()), what
    assert all(n <= counts.get(op, 0) for op, n in ops.items()), what
    assert all(n - ops.get(op, 0) >= cov.unsupported.get(op, 0) for op, n in counts.items()), what


@pytest.mark.slow
def test_op_counts_and_supported_ops_match_the_checkers_nodes(artifact: tuple[str, Path]) -> None:
    target, path = artifact
    accelerators = [a.name for a in get_target(target).accelerators]
    assert op_counts(path, target) == op_counts(path, target, accelerators[0])  # default: the first accelerator
    for acc in accelerators:
        counts, cov = op_counts(path, target, acc), coverage(path, target, acc)
        assert sum(counts.values()) == cov.nodes, (acc, counts, cov.nodes)
        assert list(counts) == sorted(counts) and all(n > 0 for n in counts.values())
        # the checker's unsupported ops are named as the counts name them, and are among them
        assert all(counts.get(op, 0) >= n for op, n in cov.unsupported.items()), (acc, counts, cov.unsupported)
        _assert_supported_ops_fit(counts, cov)
        if not cov.problems:  # no rule refused a node: the nodes off the accelerator are the unsupported ops
            off = {op: n - cov.supported_ops.get(op, 0) for op, n in counts.items()}
            assert {op: n for op, n in off.items() if n} == cov.unsupported, (acc, off, cov.unsupported)


def _ops_touching_rank_above(path: Path, max_rank: int) -> dict[str, int]:
    """Op name -> count of the ops with an input or output tensor of rank > ``max_rank``, read by the LiteRT
    interpreter (its op list and tensor shapes, no delegate), not by the checker's flatbuffer reader."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(model_path=str(path),
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    rank = {t["index"]: len(t["shape"]) for t in interp.get_tensor_details()}
    ops = interp._get_ops_details()  # noqa: SLF001 - the interpreter's only view of its op list
    return count_by_type(op["op_name"] for op in ops
                         if any(rank.get(int(i), 0) > max_rank for i in [*op["inputs"], *op["outputs"]] if i >= 0))


@pytest.mark.slow
def test_supported_ops_leave_out_the_nodes_a_rule_refuses(convert: Callable[..., Path]) -> None:
    """TFLite GPU on the ViT: every op type is in the delegate's table, but its qkv split goes through 5-D
    tensors and the delegate takes rank <= 4 only. Counts less ``unsupported`` would put those nodes on it."""
    path = convert("tflite")
    counts, cov = op_counts(path, "tflite", "gpu"), coverage(path, "tflite", "gpu")
    refused = _ops_touching_rank_above(path, 4)
    assert refused and cov.unsupported == {}, (refused, cov.unsupported)
    assert any(p.startswith("rank>4: ") for p in cov.problems), cov.problems
    expected = {op: n - refused.get(op, 0) for op, n in counts.items() if n > refused.get(op, 0)}
    assert cov.supported_ops == expected, (cov.supported_ops, expected)
    assert sum(cov.supported_ops.values()) == cov.supported == cov.nodes - sum(refused.values()) < cov.nodes
    _assert_supported_ops_fit(counts, cov)


@pytest.mark.slow
def test_supported_ops_are_empty_for_an_fp32_core_ml_program(convert: Callable[..., Path]) -> None:
    """An fp32-typed ML Program never runs on the Neural Engine: a whole-program rule, no op type refused."""
    path = convert("coreml", "fp32")
    cov = coverage(path, "coreml", "ane")
    assert cov.nodes == sum(op_counts(path, "coreml", "ane").values()) > 0
    assert cov.supported_ops == {} and cov.supported == 0 and cov.unsupported == {}, cov.to_dict()
    assert any(p.startswith("fp32 program: ") for p in cov.problems), cov.problems


@pytest.mark.slow
def test_op_counts_follow_the_models_layers(artifact: tuple[str, Path], vit: tuple[nn.Module, torch.Tensor]) -> None:
    target, path = artifact
    expected = _expected_layers(vit[0])
    for acc in (a.name for a in get_target(target).accelerators):
        counts = op_counts(path, target, acc)
        found = {kind: sum(counts.get(op, 0) for op in ops) for kind, ops in _LAYER_OPS[target].items()}
        assert found == {kind: expected[kind] for kind in found}, (acc, counts)


def _if_model(path: Path, quantized: bool) -> Path:
    """x -> [QuantizeLinear -> DequantizeLinear ->] Relu -> Neg, and an If whose branches hold one Sigmoid and
    one Tanh: the usability checker counts branch nodes, the XNNPACK rules and NNAPI's QDQ verdicts do not."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def branch(name: str, op: str) -> onnx.GraphProto:
        out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 4])
        return helper.make_graph([helper.make_node(op, ["x"], [f"{name}_y"])], name, [], [out])

    nodes, inits, src = [], [], "x"
    if quantized:
        inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
                 numpy_helper.from_array(np.array(128, np.uint8), "z")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"])]
        src = "dq"
    nodes += [helper.make_node("Relu", [src], ["r0"]), helper.make_node("Neg", ["r0"], ["r"]),
              helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", "Sigmoid"),
                               else_branch=branch("else", "Tanh"))]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                     helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_onnx_op_counts_follow_the_checkers_subgraph_rules(tmp_path: Path) -> None:
    _require("onnx")
    main = {"If": 1, "Neg": 1, "Relu": 1}
    qdq = {"DequantizeLinear": 1, "QuantizeLinear": 1}
    branches = {"Sigmoid": 1, "Tanh": 1}
    # (quantized, accelerator) -> (counts, ops on the accelerator). The CPU EP takes every node; the XNNPACK EP
    # none (Relu only fused into a Conv or pool); ORT's NNAPI table has all these ops but If (its QDQ path
    # judges the main graph only); its Core ML MLProgram table has Relu, Sigmoid and Tanh, not Neg, If or Q/DQ.
    nnapi_on, coreml_on = {"Neg": 1, "Relu": 1}, {"Relu": 1} | branches
    expected = {
        (False, "cpu"): (main, main), (False, "xnnpack"): (main, {}),
        (False, "nnapi"): (main | branches, nnapi_on | branches), (False, "coreml"): (main | branches, coreml_on),
        (True, "cpu"): (main | qdq, main | qdq), (True, "xnnpack"): (main | qdq, {}),
        (True, "nnapi"): (main | qdq, nnapi_on | qdq), (True, "coreml"): (main | qdq | branches, coreml_on),
    }
    paths = {q: _if_model(tmp_path / f"if{int(q)}.onnx", q) for q in (False, True)}
    for (quantized, acc), (counts, on) in expected.items():
        found, cov = op_counts(paths[quantized], "onnx", acc), coverage(paths[quantized], "onnx", acc)
        assert found == dict(sorted(counts.items())), (quantized, acc, found)
        assert sum(found.values()) == cov.nodes, (quantized, acc)
        assert cov.supported_ops == dict(sorted(on.items())), (quantized, acc, cov.supported_ops)
        _assert_supported_ops_fit(found, cov)


def _save_onnx(path: Path, nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: Sequence[Any] = ()) -> Path:
    """A one-graph opset-17 model of these nodes, saved unchecked (a test may want an op ONNX does not know)."""
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def test_onnx_supported_ops_leave_out_the_nodes_a_rule_refuses(tmp_path: Path) -> None:
    """x [n, 4] -> Relu -> Reshape to [1, 4] -> Sigmoid: ORT's NNAPI and Core ML tables have the three ops, but
    their usability checker refuses the two nodes whose input shape is dynamic; a model the CPU EP cannot
    load has nothing on it."""
    _require("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    def value(name: str, dims: list[Any]) -> Any:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    dynamic = _save_onnx(tmp_path / "dynamic.onnx",
                         [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Reshape", ["r", "shape"], ["s"]),
                          helper.make_node("Sigmoid", ["s"], ["y"])],
                         [value("x", ["n", 4])], [value("y", [1, 4])],
                         [numpy_helper.from_array(np.array([1, 4], np.int64), "shape")])
    for acc in ("nnapi", "coreml"):
        counts, cov = op_counts(dynamic, "onnx", acc), coverage(dynamic, "onnx", acc)
        assert counts == {"Relu": 1, "Reshape": 1, "Sigmoid": 1} and cov.unsupported == {}, (acc, counts, cov)
        assert cov.supported_ops == {"Sigmoid": 1} and cov.supported == 1, (acc, cov.supported_ops)
        assert cov.problems == ["dynamic shape: 2 nodes with dynamic input shapes"], (acc, cov.problems)
        _assert_supported_ops_fit(counts, cov)
    unknown = _save_onnx(tmp_path / "unknown.onnx", [helper.make_node("NoSuchOp", ["x"], ["y"])],
                         [value("x", [1, 4])], [value("y", [1, 4])])
    cov = coverage(unknown, "onnx", "cpu")
    assert cov.nodes == 1 and cov.supported_ops == {} and cov.problems[0].startswith("session: "), cov.to_dict()


def test_op_counts_reject_bad_input_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(EdgevitError, match="unknown target 'tf'"):
        op_counts(tmp_path / "m.tflite", "tf")
    with pytest.raises(EdgevitError, match="target 'onnx' has no accelerator 'gpu'"):
        op_counts(tmp_path / "m.onnx", "onnx", "gpu")
    _require("onnx")
    with pytest.raises(EdgevitError, match="no ONNX model at"):
        op_counts(tmp_path / "missing.onnx", "onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(EdgevitError, match=r"^onnx:xnnpack op counts of .*garbage\.onnx failed: \w+") as err:
        op_counts(garbage, "onnx", "xnnpack")
    assert "\n" not in str(err.value)
