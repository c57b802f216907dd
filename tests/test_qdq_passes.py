"""The ONNX quantized-graph passes (export/backends/onnx/qdq_passes.py), each on a small QDQ graph: what it
rewrites (before -> after), that onnxruntime runs both, and how far the outputs may move (identical for the
exact ones, within the int8 arithmetic the pass changes for the others); the runner's rollback; the NNAPI
QDQ rules of the coverage checker on the same graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgevit.errors import EdgevitError  # noqa: E402
from edgevit.export.backends.onnx import qdq_passes as qp  # noqa: E402
from edgevit.export.backends.onnx.coverage import onnx_ep_coverage  # noqa: E402
from edgevit.export.quantization import passes as registry  # noqa: E402

RNG = np.random.default_rng(0)


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _model(nodes: list, inits: list, inputs: dict[str, tuple[int, ...]], outputs: dict[str, tuple[int, ...]]
           ) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _qdq(x: str, name: str, scale: float, zero: int, dtype=np.int8) -> tuple[list, list, str]:
    """``x -> QuantizeLinear -> DequantizeLinear``: (nodes, initializers, the dequantized name)."""
    inits = [_init(f"{name}_s", np.float32(scale)), _init(f"{name}_z", dtype(zero))]
    return ([helper.make_node("QuantizeLinear", [x, f"{name}_s", f"{name}_z"], [f"{name}_q"], name=f"{name}_Q"),
             helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"],
                              name=f"{name}_DQ")], inits, f"{name}_dq")


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], optimize: bool = False) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if not optimize:  # the graph as written: every quantizer executed
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _apply(pass_name: str, model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    sites = registry.QUANTIZED_PASSES[pass_name]().run(out)
    onnx.checker.check_model(out)
    return out, sites


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _nnapi(model: onnx.ModelProto, tmp_path: Path, name: str = "m.onnx"):
    path = tmp_path / name
    onnx.save(model, str(path))
    return onnx_ep_coverage(path, "nnapi")


# --- the graphs ------------------------------------------------------------------------------------------------


def _add_graph() -> onnx.ModelProto:
    """int8 activations and an int8 quantized constant: x -> Q/DQ -> Add(DQ(c)) -> Q/DQ -> y (all s8)."""
    qx, ix, x = _qdq("x", "x", 0.02, 3)
    c = RNG.integers(-127, 127, size=(8,)).astype(np.int8)
    consts = [_init("c_q", c), _init("c_s", np.float32(0.01)), _init("c_z", np.int8(-5))]
    dq_c = helper.make_node("DequantizeLinear", ["c_q", "c_s", "c_z"], ["c_dq"], name="c_DQ")
    add = helper.make_node("Add", [x, "c_dq"], ["sum"], name="add")
    qy, iy, y = _qdq("sum", "sum", 0.03, -7)
    out = helper.make_node("Identity", [y], ["y"])
    return _model([*qx, dq_c, add, *qy, out], [*ix, *consts, *iy], {"x": (2, 8)}, {"y": (2, 8)})


def _matmul_graph(per_channel: bool = True) -> tuple[onnx.ModelProto, np.ndarray]:
    """DQ(x) @ DQ(w_int8 per output channel) -> Q/DQ -> y: a MatMul unit with NNAPI-refused weights."""
    qx, ix, x = _qdq("x", "x", 0.02, 0)
    real = RNG.normal(size=(16, 4)).astype(np.float32) * np.array([0.1, 1.0, 3.0, 0.5], np.float32)
    scale = np.abs(real).max(0) / 127 if per_channel else np.float32(np.abs(real).max() / 127)
    stored = np.clip(np.round(real / scale), -127, 127).astype(np.int8)
    zero = np.zeros(4, np.int8) if per_channel else np.int8(0)
    inits = [_init("w_q", stored), _init("w_s", np.asarray(scale, np.float32)), _init("w_z", zero)]
    dq_w = helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w_dq"], name="w_DQ", axis=1)
    mm = helper.make_node("MatMul", [x, "w_dq"], ["p"], name="mm")
    qy, iy, y = _qdq("p", "p", 0.05, 0)
    out = helper.make_node("Identity", [y], ["y"])
    model = _model([*qx, dq_w, mm, *qy, out], [*ix, *inits, *iy], {"x": (3, 16)}, {"y": (3, 4)})
    return model, stored.astype(np.float32) * np.asarray(scale, np.float32)


def _unit_graph(op: str, zero: int = 0, **attrs) -> onnx.ModelProto:
    """DQ(x) -> op -> Q/DQ -> y, with the input quantizer's range [scale * (-128 - zero), ...] (zero = -128:
    the range starts at 0, as when quantize_static folds a Relu into it)."""
    qx, ix, x = _qdq("x", "x", 0.02, zero)
    node = helper.make_node(op, [x], ["o"], name=op.lower(), **attrs)
    qy, iy, y = _qdq("o", "o", 0.01, 0)
    out = helper.make_node("Identity", [y], ["y"])
    shape = (8, 2) if op == "Transpose" else (2, 8)
    return _model([*qx, node, *qy, out], [*ix, *iy], {"x": (2, 8)}, {"y": shape})


FEED8 = {"x": RNG.normal(size=(2, 8)).astype(np.float32)}


# --- the passes --------------------------------------------------------------------------------------------------


def test_uint8_activations_is_exact_and_leaves_no_int8(tmp_path: Path) -> None:
    before = _add_graph()
    after, sites = _apply("uint8_activations", before)
    assert sites == 3  # two activation Q/DQ pairs and the constant's DequantizeLinear
    zero_types = {i.data_type for i in after.graph.initializer if i.name.endswith("zero_point")}
    assert zero_types == {TensorProto.UINT8}
    for optimize in (False, True):  # the graph as written, and onnxruntime's fused integer kernels
        np.testing.assert_array_equal(_run(after, FEED8, optimize)[0], _run(before, FEED8, optimize)[0])
    assert "int8 qdq" not in " ".join(_nnapi(after, tmp_path).problems)
    assert any(p.startswith("int8 qdq") for p in _nnapi(before, tmp_path, "b.onnx").problems)


def test_per_tensor_weights_rerounds_within_half_a_step(tmp_path: Path) -> None:
    before, real = _matmul_graph()
    after, sites = _apply("per_tensor_weights", before)
    assert sites == 1
    weights = {i.name: numpy_helper.to_array(i) for i in after.graph.initializer}
    dq = next(n for n in after.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights
              and weights[n.input[0]].dtype == np.int8 and weights[n.input[0]].ndim == 2)
    scale = weights[dq.input[1]]
    assert scale.size == 1 and not weights[dq.input[2]].any()
    requantized = weights[dq.input[0]].astype(np.float32) * scale
    step = np.abs(real).max() / 127
    assert np.abs(requantized - real).max() <= step / 2 * (1 + 1e-6)  # one grid, re-rounded once
    feed = {"x": RNG.normal(size=(3, 16)).astype(np.float32)}
    x = np.asarray(_run(_model([*_qdq("x", "x", 0.02, 0)[0], helper.make_node("Identity", ["x_dq"], ["y"])],
                                 _qdq("x", "x", 0.02, 0)[1], {"x": (3, 16)}, {"y": (3, 16)}), feed)[0])
    # |dy| <= sum_k |x_k| step / 2, plus one output step (0.05) of re-rounding at the output quantizer
    bound = np.abs(x).sum(1, keepdims=True) * step / 2 + 0.05
    assert (np.abs(_run(after, feed)[0] - _run(before, feed)[0]) <= bound + 1e-6).all()
    assert not any(p.startswith("per-channel") for p in _nnapi(after, tmp_path).problems)
    assert any(p.startswith("per-channel: MatMul") for p in _nnapi(before, tmp_path, "b.onnx").problems)


def test_per_tensor_weights_leaves_per_tensor_and_conv_weights() -> None:
    assert _apply("per_tensor_weights", _matmul_graph(per_channel=False)[0])[1] == 0


def test_nnapi_float_units_keeps_the_folded_relu(tmp_path: Path) -> None:
    """The input quantizer's range starts at 0 (a Relu quantize_static folded into it): the float Tanh must
    still read max(x, 0), so the pass keeps the pair's clip and drops only its rounding."""
    before = _unit_graph("Tanh", zero=-128)
    after, sites = _apply("nnapi_float_units", before)
    assert sites == 1
    assert _ops(after).count("QuantizeLinear") == 1 and "Clip" in _ops(after)  # the output pair became a clip
    got = _run(after, FEED8)[0]
    x_dq = np.clip(np.round(FEED8["x"] / 0.02) - 128, -128, 127).astype(np.float32)
    x_dq = (x_dq + 128) * np.float32(0.02)  # DQ(Q(x)) with zero point -128: negatives clipped to 0
    np.testing.assert_allclose(got, np.clip(np.tanh(x_dq), -1.28, 1.27), rtol=0, atol=1e-6)
    assert np.abs(got - _run(before, FEED8)[0]).max() <= 0.01 / 2 + 1e-6  # the output rounding removed
    assert not any(p.startswith("qdq unit") for p in _nnapi(after, tmp_path).problems)
    assert "qdq unit: Tanh x1 (no quantized NNAPI kernel: the unit runs on the CPU EP)" in \
        _nnapi(before, tmp_path, "b.onnx").problems


def test_nnapi_float_units_leaves_nnapi_units() -> None:
    assert _apply("nnapi_float_units", _unit_graph("Transpose", perm=[1, 0]))[1] == 0
    assert _apply("nnapi_float_units", _unit_graph("Softmax", axis=-1))[1] == 0  # NNAPI has a quantized Softmax


def test_squeeze_as_reshape_is_exact() -> None:
    qx, ix, x = _qdq("x", "x", 0.02, 0)
    axes = _init("axes", np.array([1], np.int64))
    squeeze = helper.make_node("Squeeze", [x, "axes"], ["o"], name="squeeze")
    qy, iy, y = _qdq("o", "o", 0.02, 0)
    before = _model([*qx, squeeze, *qy, helper.make_node("Identity", [y], ["y"])], [*ix, axes, *iy],
                    {"x": (2, 1, 8)}, {"y": (2, 8)})
    after, sites = _apply("squeeze_as_reshape", before)
    assert sites == 1 and "Squeeze" not in _ops(after) and "Reshape" in _ops(after)
    feed = {"x": RNG.normal(size=(2, 1, 8)).astype(np.float32)}
    np.testing.assert_array_equal(_run(after, feed)[0], _run(before, feed)[0])


def test_softmax_output_scale_is_nnapis_and_within_a_step(tmp_path: Path) -> None:
    before, _ = _apply("uint8_activations", _unit_graph("Softmax", axis=-1))
    after, sites = _apply("softmax_output_scale", before)
    assert sites == 1
    q = next(n for n in after.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "o")
    values = {i.name: numpy_helper.to_array(i) for i in after.graph.initializer}
    assert float(values[q.input[1]]) == 1 / 256 and values[q.input[2]] == 0
    assert values[q.input[2]].dtype == np.uint8
    # both grids round probabilities in [0, 1]: at most half a step each apart, plus the 1/256 clipped at the top
    assert np.abs(_run(after, FEED8)[0] - _run(before, FEED8)[0]).max() <= 0.01 / 2 + 1 / 256 + 1e-6
    assert not any(p.startswith("softmax output scale") for p in _nnapi(after, tmp_path).problems)
    assert any(p.startswith("softmax output scale: Softmax") for p in _nnapi(before, tmp_path, "b.onnx").problems)


def test_quantize_bias_and_dequantize_float_constants() -> None:
    """A Conv with a float bias is no unit; quantize_bias makes it one (bias in steps of s_x * s_w). A weight
    DequantizeLinear no unit reads becomes its float values (exact)."""
    qx, ix, x = _qdq("x", "x", 0.02, 0)
    w = RNG.integers(-127, 127, size=(4, 2, 1, 1)).astype(np.int8)
    inits = [_init("w_q", w), _init("w_s", np.full(4, 0.01, np.float32)), _init("w_z", np.zeros(4, np.int8)),
             _init("b", RNG.normal(size=4).astype(np.float32))]
    dq_w = helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w_dq"], name="w_DQ", axis=0)
    conv = helper.make_node("Conv", [x, "w_dq", "b"], ["o"], name="conv")
    qy, iy, y = _qdq("o", "o", 0.05, 0)
    before = _model([*qx, dq_w, conv, *qy, helper.make_node("Identity", [y], ["y"])], [*ix, *inits, *iy],
                    {"x": (1, 2, 3, 3)}, {"y": (1, 4, 3, 3)})
    feed = {"x": RNG.normal(size=(1, 2, 3, 3)).astype(np.float32)}
    assert not qp.qdq_units(before)
    biased, sites = _apply("quantize_bias", before)
    assert sites == 1 and [u.node.op_type for u in qp.qdq_units(biased)] == ["Conv"]
    # the bias moves by at most half of s_x * s_w = 1e-4: far below one output step (0.05)
    assert np.abs(_run(biased, feed)[0] - _run(before, feed)[0]).max() <= 0.05 + 1e-6
    folded, sites = _apply("dequantize_float_constants", before)
    assert sites == 1 and _ops(folded).count("DequantizeLinear") == 2  # x's and o's; the weight is float
    np.testing.assert_array_equal(_run(folded, feed)[0], _run(before, feed)[0])


def test_every_nnapi_pass_is_registered_listed_and_named_as_a_fix() -> None:
    from edgevit.export.coverage import fixes_for

    assert set(qp.PIPELINES["nnapi"]) <= set(registry.QUANTIZED_PASSES)
    rows = {r["name"]: r for r in registry.listing_rows()}
    for name in qp.PIPELINES["nnapi"]:
        cls = registry.QUANTIZED_PASSES[name]
        assert "Before" in cls.__doc__ and "After" in cls.__doc__
        assert rows[name]["pipelines"] == ["onnx:nnapi"] and rows[name]["summary"] == cls.summary()
    assert registry.quantized_pipeline("onnx", "cpu") == () and registry.quantized_pipeline("onnx", "nnapi", "w8") == ()
    assert fixes_for("qdq unit: Split x12 (...)", "onnx", "nnapi") == ["squeeze_as_reshape", "nnapi_float_units"]
    assert fixes_for("softmax output scale: Softmax x1 (...)", "onnx", "nnapi") == \
        ["softmax_output_scale", "nnapi_float_softmax"]


# --- the runner: a rewrite never makes a working model fail ---------------------------------------------------------


class _Executor:
    def __init__(self, reference: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
        self.ref, self.feeds = reference, feeds

    def copy(self, model: onnx.ModelProto) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out

    def outputs(self, model: onnx.ModelProto) -> list[np.ndarray]:
        onnx.checker.check_model(model)
        return _run(model, self.feeds)

    def reference(self) -> list[np.ndarray]:
        return _run(self.ref, self.feeds)


def _fp32_add() -> onnx.ModelProto:
    c = numpy_helper.to_array(next(i for i in _add_graph().graph.initializer if i.name == "c_q"))
    inits = [_init("c", (c.astype(np.float32) + 5) * np.float32(0.01))]
    return _model([helper.make_node("Add", ["x", "c"], ["y"])], inits, {"x": (2, 8)}, {"y": (2, 8)})


@pytest.fixture
def test_passes():
    """Two deliberately wrong passes, registered for one test."""

    class Breaks(registry.ArtifactPass):
        """Points the Add at a tensor that does not exist. Before: Add(x, c). After: Add(x, missing)."""
        name, backend = "test_breaks", "onnx"

        def run(self, model):
            next(n for n in model.graph.node if n.op_type == "Add").input[1] = "missing"
            return 1

    class Scales(registry.ArtifactPass):
        """Doubles the output scale. Before: Q(s). After: Q(2 s): every output off by up to a step."""
        name, backend, exact = "test_scales", "onnx", False

        def run(self, model):
            for i in model.graph.initializer:
                if i.name == "c_s":
                    i.CopyFrom(_init("c_s", np.float32(0.5)))
            return 1

    for cls in (Breaks, Scales):
        registry.register_quantized_pass(cls)
    yield
    for cls in (Breaks, Scales):
        registry.QUANTIZED_PASSES.pop(cls.name)


def test_runner_rolls_back_what_breaks_or_moves_beyond_int8(test_passes) -> None:
    model = _add_graph()
    executor = _Executor(_fp32_add(), FEED8)
    result = registry.run_quantized_passes(["test_breaks", "test_scales", "uint8_activations"], model, executor,
                                           strict=False)
    status = {r.name: r.status for r in result.reports}
    assert status == {"test_breaks": "rolled back", "test_scales": "rolled back", "uint8_activations": "applied"}
    reasons = {r.name: r.reason for r in result.reports}
    assert "does not load or run" in reasons["test_breaks"]
    assert "beyond int8 arithmetic" in reasons["test_scales"]
    applied = result.reports[-1]
    assert applied.sqnr_after_db == applied.sqnr_before_db  # exact
    np.testing.assert_array_equal(_run(result.model, FEED8)[0], _run(model, FEED8)[0])
    with pytest.raises(EdgevitError, match="quantized pass 'test_breaks' failed"):
        registry.run_quantized_passes(["test_breaks"], model, executor, strict=True)
    # strict or not, a pass rolled back for its accuracy is a decision, not an error
    strict = registry.run_quantized_passes(["test_scales"], model, executor, strict=True)
    assert strict.reports[0].status == "rolled back" and strict.reports[0].numeric


def test_runner_leaves_an_artifact_that_does_not_run_alone() -> None:
    broken = _add_graph()
    next(n for n in broken.graph.node if n.op_type == "Add").input[1] = "missing"
    result = registry.run_quantized_passes(["uint8_activations"], broken, _Executor(_fp32_add(), FEED8), strict=False)
    assert [r.status for r in result.reports] == ["not run"] and result.model is broken


def test_docs_table_lists_every_quantized_pass() -> None:
    """docs/placement.md's table, row for row, from the registry (name, exactness, pipelines, summary)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "placement.md").read_text()
    block = re.search(r"<!-- quantized-passes-table -->\n(.*?)<!-- /quantized-passes-table -->", text, re.S)
    rows = [line for line in block.group(1).splitlines() if line.startswith("| `")]
    expected = [f"| `{r['name']}` | {'exact' if r['exact'] else 'int8 arithmetic'} | {', '.join(r['pipelines'])} | "
                f"{r['summary']} |" for r in registry.listing_rows()]
    assert sorted(rows) == sorted(expected)
