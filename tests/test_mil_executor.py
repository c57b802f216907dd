"""The MIL reference executor on saved .mlpackage files: loading, defaults, fp16 mode, the fp16 range
report, unsupported ops, and that a wrong number is caught."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from edgevit.export.backends.coreml.mil import MILExecutor, UnsupportedOpError, fp16_range_report, load_program
from edgevit.export.parity import compare

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402


def save_program(prog, path, precision=None) -> str:
    """A MIL program built here, saved as an .mlpackage (converts on Linux; no prediction needed)."""
    kwargs = {"compute_precision": precision} if precision is not None else {"compute_precision": ct.precision.FLOAT32}
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                       skip_model_load=True, **kwargs)
    model.save(str(path))
    return str(path)


def test_program_with_defaults_left_out_runs_like_numpy(tmp_path) -> None:
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, 8, 8))], opset_version=ct.target.iOS17)
    def prog(x):
        y = mb.conv(x=x, weight=w, pad_type="same")  # strides, dilations, groups, bias: defaults
        y = mb.reduce_mean(x=y, axes=[2, 3], keep_dims=False)
        y = mb.softmax(x=y)  # axis default -1
        return mb.concat(values=[y, y], axis=0, interleave=True)

    program = load_program(save_program(prog, tmp_path / "p.mlpackage"))
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    (out,) = MILExecutor(program).run([x])
    conv = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding="same")
    want = torch.softmax(conv.mean((2, 3)), -1).repeat(2, 1).numpy()
    assert out.shape == (2, 4) and np.abs(out - want).max() <= 1e-6


def test_fp16_mode_rounds_every_value(tmp_path) -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=(64,))], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.mul(x=mb.add(x=x, y=np.float32(1 / 3)), y=np.float32(3.0))

    program = load_program(save_program(prog, tmp_path / "p.mlpackage"))
    x = np.linspace(-2, 2, 64, dtype=np.float32)
    (fp32,) = MILExecutor(program, "fp32").run([x])
    (fp16,) = MILExecutor(program, "fp16").run([x])
    assert np.abs(fp32 - (x + 1 / 3) * 3).max() <= 1e-6
    assert np.array_equal(fp16, fp16.astype(np.float16).astype(np.float32))  # fp16-representable
    x16, third = x.astype(np.float16).astype(np.float32), np.float32(np.float16(1 / 3))
    want = (((x16 + third).astype(np.float16).astype(np.float32)) * 3).astype(np.float16).astype(np.float32)
    assert np.array_equal(fp16, want)  # rounded at the input, the constant, and after each op


def test_fp16_range_report_names_overflow_underflow_and_loss(tmp_path) -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 256))], opset_version=ct.target.iOS17)
    def prog(x):
        big = mb.mul(x=x, y=np.float32(1e5), name="scale_up")  # |x| ~ 1 -> 1e5 > 65504: inf in fp16
        tiny = mb.mul(x=x, y=np.float32(1e-9), name="scale_down")  # ~1e-9 < 2**-25: 0 in fp16
        shifted = mb.add(x=x, y=np.float32(2000.0), name="shift")
        back = mb.sub(x=shifted, y=np.float32(2000.0), name="unshift")  # fp16 ulp at 2000 is 1: loss
        ok = mb.relu(x=x, name="fine")
        return mb.concat(values=[big, tiny, back, ok], axis=0, name="out")

    program = load_program(save_program(prog, tmp_path / "p.mlpackage"))
    x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    report = fp16_range_report(program, [x])
    by_op = {i["op"]: i for i in report["issues"]}
    assert "scale_up" in by_op and by_op["scale_up"]["overflow"] > 0
    assert "scale_down" in by_op and by_op["scale_down"]["underflow"] == by_op["scale_down"]["nonzero"]
    assert "unshift" in by_op and by_op["unshift"]["rel_error"] > 1e-2
    assert "fine" not in by_op and "shift" not in by_op  # relu and a plain add are exact to fp16 rounding
    assert by_op["scale_up"]["shape"] == [1, 256] and by_op["scale_up"]["op_type"] == "mul"


def test_unsupported_op_is_a_clear_error_before_running(tmp_path) -> None:
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 5, 5))], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.local_response_norm(x=x, size=3)

    path = save_program(prog, tmp_path / "lrn.mlpackage")
    program = load_program(path)
    with pytest.raises(UnsupportedOpError, match=r"'local_response_norm' in .*lrn\.mlpackage not implemented"):
        MILExecutor(program)


class SmallNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        y = self.conv(x).flatten(2).transpose(1, 2)
        return self.head(torch.nn.functional.gelu(self.norm(y))).mean(1)


def test_a_wrong_weight_in_the_package_fails_parity(tmp_path) -> None:
    """The check can fail: perturb one converted weight by 1 % and the fp32 comparison catches it."""
    torch.manual_seed(0)
    model = SmallNet().eval()
    x = torch.randn(1, 3, 16, 16)
    program_ = torch.export.export(model, (x,))
    mlmodel = ct.convert(program_.run_decompositions({}), convert_to="mlprogram", skip_model_load=True,
                         minimum_deployment_target=ct.target.iOS17, compute_precision=ct.precision.FLOAT32)
    mlmodel.save(str(tmp_path / "net.mlpackage"))
    program = load_program(tmp_path / "net.mlpackage")
    with torch.no_grad():
        ref = [[model(x).numpy()]]
    good = compare(ref, [MILExecutor(program).run([x.numpy()])], ["y"], "fp32")
    assert good.status == "passed", good.to_dict()
    weight = max((k for k, v in program.consts.items() if getattr(v, "ndim", 0) == 2), key=lambda k: program.consts[k].size)
    program.consts[weight] = program.consts[weight] * np.float32(1.01)
    bad = compare(ref, [MILExecutor(program).run([x.numpy()])], ["y"], "fp32")
    assert bad.status == "failed"


def test_missing_package_and_missing_inputs_are_clear(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no Core ML package"):
        load_program(tmp_path / "nope.mlpackage")

    @mb.program(input_specs=[mb.TensorSpec(shape=(2,))], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.relu(x=x)

    program = load_program(save_program(prog, tmp_path / "p.mlpackage"))
    with pytest.raises(ValueError, match="missing inputs"):
        MILExecutor(program).run({})


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS (macos-coreml workflow)")
def test_executor_matches_core_ml_prediction(tmp_path) -> None:
    torch.manual_seed(0)
    model = SmallNet().eval()
    x = torch.randn(1, 3, 16, 16)
    mlmodel = ct.convert(torch.export.export(model, (x,)).run_decompositions({}), convert_to="mlprogram",
                         minimum_deployment_target=ct.target.iOS17, compute_precision=ct.precision.FLOAT32,
                         compute_units=ct.ComputeUnit.CPU_ONLY)
    mlmodel.save(str(tmp_path / "net.mlpackage"))
    name = mlmodel.get_spec().description.input[0].name
    out_name = mlmodel.get_spec().description.output[0].name
    real = np.asarray(mlmodel.predict({name: x.numpy()})[out_name])
    (ours,) = MILExecutor(load_program(tmp_path / "net.mlpackage")).run([x.numpy()])
    assert compare([[real]], [[ours]], ["y"], "fp32").status == "passed"
