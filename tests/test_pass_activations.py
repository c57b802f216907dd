"""fuse_gelu and gelu_tanh: numerics on tiny modules, and the backend limit each works around."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

from edgevit.export.passes import run_pipeline
from edgevit.export.passes.activations import GELU_TANH_MAX_ABS_ERROR
from edgevit.export.passes.base import aten, is_op
from edgevit.export.targets import get_target

F32_EPS = torch.finfo(torch.float32).eps


class Fn(nn.Module):
    """A module computing ``fn(x)`` (``fn`` may use ``self.lin``)."""

    def __init__(self, fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.fn = fn
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


def count(program: torch.export.ExportedProgram, *ops: object) -> int:
    return sum(is_op(n, *ops) for n in program.graph.nodes)


def gelu_nodes(program: torch.export.ExportedProgram) -> list[str]:
    return [n.kwargs.get("approximate", "none") for n in program.graph.nodes if is_op(n, aten.gelu)]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


SQ2 = math.sqrt(2.0)
C1 = math.sqrt(2.0 / math.pi)

# Hand-written GELUs as they appear in the wild (BERT, HF gelu_new / gelu_fast, timm-style helpers).
ERF_FORMS = {
    "half_x_times": lambda m, x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "x_half_mul_const": lambda m, x: x * 0.5 * (1.0 + torch.erf(x * 0.7071067811865476)),
    "div_two": lambda m, x: x * (1 + torch.erf(x / SQ2)) / 2,
    "method_chain": lambda m, x: torch.erf(x / 1.4142135623730951).add(1.0).mul(x).mul(0.5),
    "erf_plus_one_right": lambda m, x: (x * 0.5) * (torch.erf(x / SQ2) + 1),
    "after_linear": lambda m, x: (lambda y: y * 0.5 * (1 + torch.erf(y / SQ2)))(m.lin(x)),
}
TANH_FORMS = {
    "gelu_new_pow": lambda m, x: 0.5 * x * (1.0 + torch.tanh(C1 * (x + 0.044715 * torch.pow(x, 3.0)))),
    "gelu_fast": lambda m, x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "cube_by_mul": lambda m, x: x * 0.5 * (torch.tanh((x + 0.044715 * x * x * x) * C1) + 1.0),
}


@pytest.mark.parametrize("shape", [(2, 16), (1, 7, 16)])
@pytest.mark.parametrize("form", list(ERF_FORMS) + list(TANH_FORMS))
def test_fuse_gelu_equivalence(form: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    fn, approximate = (ERF_FORMS[form], "none") if form in ERF_FORMS else (TANH_FORMS[form], "tanh")
    model = Fn(fn).eval()
    x = torch.randn(shape) * 3
    r = run_pipeline(model, (x,), ["fuse_gelu"])
    assert r.reports[0].sites == 1
    assert gelu_nodes(r.program) == [approximate]
    assert count(r.program, aten.erf, aten.tanh) == 0
    with torch.no_grad():
        ref, out = model(x), r.model(x)
    # The same function with a different rounding sequence: a few fp32 ulps of |output|
    # (gelu_fast's 10-digit constant differs from sqrt(2/pi) by 3e-11 relative, far below that).
    assert max_diff(out, ref) <= 8 * F32_EPS * ref.abs().max().item()


NOT_GELU = {
    "wrong_scale": lambda m, x: 0.5 * x * (1 + torch.erf(x / 2.0)),  # erf(x/2), not x/sqrt(2)
    "other_tensor": lambda m, x: 0.5 * m.lin(x) * (1 + torch.erf(x / SQ2)),  # multiplies a different x
    "half_missing": lambda m, x: x * (1 + torch.erf(x / SQ2)),  # 2 * gelu(x)... stops short of 0.5
    "wrong_cubic": lambda m, x: 0.5 * x * (1.0 + torch.tanh(C1 * (x + 0.5 * x ** 3))),
    "intermediate_reused": lambda m, x: 0.5 * x * (1 + torch.erf(x / SQ2)) + torch.erf(x / SQ2),
}


@pytest.mark.parametrize("form", list(NOT_GELU))
def test_fuse_gelu_leaves_lookalikes_alone(form: str) -> None:
    model = Fn(NOT_GELU[form]).eval()
    x = torch.randn(2, 16)
    r = run_pipeline(model, (x,), ["fuse_gelu"])
    if form == "intermediate_reused":
        # Two erf nodes (no CSE in the capture): the one inside the formula is fused, the extra one stays.
        assert r.reports[0].sites == 1 and count(r.program, aten.erf) == 1
    else:
        assert r.reports[0].sites == 0
        assert not gelu_nodes(r.program)
    with torch.no_grad():
        assert max_diff(r.model(x), model(x)) <= 8 * F32_EPS * model(x).abs().max().item()


def tflite_ops(program: torch.export.ExportedProgram, x: torch.Tensor, path: Path) -> list[str]:
    from ai_edge_litert.interpreter import Interpreter

    get_target("tflite").converter_module().convert(program, (x,), path, "fp32")
    return [op["op_name"] for op in Interpreter(str(path))._get_ops_details()]  # noqa: SLF001


@pytest.mark.slow
def test_fuse_gelu_reason_tflite_has_gelu_but_no_erf(tmp_path: Path) -> None:
    """litert-torch: a hand-written erf GELU becomes a ~29-op polynomial (no ERF builtin); fused, one GELU."""
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_litert")
    from edgevit.export.capture import capture

    model = Fn(ERF_FORMS["half_x_times"]).eval()
    x = torch.randn(1, 8, 16)
    without = tflite_ops(capture(model, (x,)), x, tmp_path / "without.tflite")
    assert "GELU" not in without and len(without) > 10, without  # erf expanded into MUL/ADD/MIN/MAX/DIV
    r = run_pipeline(model, (x,), ["fuse_gelu"])
    assert tflite_ops(r.program, x, tmp_path / "with.tflite") == ["GELU"]


# --- gelu_tanh ------------------------------------------------------------------------------------

def test_gelu_tanh_error_bound_is_measured() -> None:
    """The stated bound is the float64 maximum over a dense grid, rounded up by < 0.2 %."""
    x = torch.linspace(-12, 12, 2_400_001, dtype=torch.float64)
    gap = (nn.functional.gelu(x) - nn.functional.gelu(x, approximate="tanh")).abs()
    assert gap.max().item() <= GELU_TANH_MAX_ABS_ERROR < 1.002 * gap.max().item()
    assert abs(abs(x[gap.argmax()].item()) - 2.699) < 1e-2
    tail = torch.tensor([-1e4, -100.0, -12.0, 12.0, 100.0, 1e4], dtype=torch.float64)
    assert (nn.functional.gelu(tail) - nn.functional.gelu(tail, approximate="tanh")).abs().max() < 1e-12


class Mlp(nn.Module):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.act = nn.GELU(approximate=approximate)
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(x)) + self.act(x * 2)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(4096,), (4, 2, 512)])
def test_gelu_tanh_activation_error(approximate: str, shape: tuple[int, ...]) -> None:
    """One GELU through the pass: within the stated gap of the exact GELU (none), or of itself (tanh)."""
    model = nn.GELU(approximate=approximate).eval()
    x = torch.linspace(-10, 10, math.prod(shape)).reshape(shape)  # covers |x| ~ 2.7 where the gap peaks
    r = run_pipeline(model, (x,), ["gelu_tanh"])
    assert r.reports[0].sites == 1
    assert count(r.program, aten.gelu, aten.erf, aten.pow) == 0 and count(r.program, aten.tanh) == 1
    with torch.no_grad():
        gap = max_diff(r.model(x), model(x))
    # fp32 rounding of ~8 mul/add/tanh ops on values of magnitude <= |x|: 8 ulp of max |x|.
    rounding = 8 * F32_EPS * x.abs().max().item()
    if approximate == "none":
        assert 0.9 * GELU_TANH_MAX_ABS_ERROR < gap <= GELU_TANH_MAX_ABS_ERROR + rounding
    else:
        assert gap <= rounding


def test_gelu_tanh_model_error_bound() -> None:
    """Two GELU sites, one feeding a linear: the output error is bounded by the gap through the linear."""
    torch.manual_seed(0)
    model = Mlp().eval()
    x = torch.randn(4, 3, 16) * 3
    r = run_pipeline(model, (x,), ["gelu_tanh"])
    assert r.reports[0].sites == 2 and count(r.program, aten.gelu, aten.erf) == 0
    per_site = GELU_TANH_MAX_ABS_ERROR + 8 * F32_EPS * 2 * x.abs().max().item()
    fc_gain = model.fc.weight.abs().sum(1).max().item()  # |fc(y) - fc(y')| <= max row L1 norm * |y - y'|
    with torch.no_grad():
        err = max_diff(r.model(x), model(x))
    assert 0 < err <= (fc_gain + 1) * per_site + 1e-6  # + fp32 rounding of the 16-term dot product
    assert r.reports[0].max_abs_change == err


@pytest.mark.slow
def test_gelu_tanh_reason_nnapi_has_no_erf(tmp_path: Path) -> None:
    """ORT's NNAPI checker: Erf (the exporter's exact GELU) unsupported without the pass, nothing with it."""
    from edgevit.export.backends.onnx.coverage import onnx_ep_coverage
    from edgevit.export.capture import capture

    model, x = Mlp().eval(), torch.randn(1, 4, 16)
    onnx = get_target("onnx").converter_module()
    onnx.convert(capture(model, (x,)), (x,), tmp_path / "without.onnx", "fp32")
    before = onnx_ep_coverage(tmp_path / "without.onnx", "nnapi")
    assert before.unsupported.get("Erf") == 2 and before.partitions > 1
    r = run_pipeline(model, (x,), ["gelu_tanh"])
    onnx.convert(r.program, (x,), tmp_path / "with.onnx", "fp32")
    after = onnx_ep_coverage(tmp_path / "with.onnx", "nnapi")
    assert after.unsupported == {} and after.partitions == 1 and after.whole


@pytest.mark.slow
def test_gelu_tanh_reason_tflite_nnapi_no_gelu_op(tmp_path: Path) -> None:
    """TFLite: aten.gelu is one GELU op, which the NNAPI delegate has no case for; after the pass the
    converter keeps MUL/ADD/TANH (it does not re-fuse them into GELU)."""
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_litert")
    from edgevit.export.capture import capture

    model, x = nn.GELU().eval(), torch.randn(1, 8, 16)
    assert tflite_ops(capture(model, (x,)), x, tmp_path / "without.tflite") == ["GELU"]
    r = run_pipeline(model, (x,), ["gelu_tanh"])
    assert set(tflite_ops(r.program, x, tmp_path / "with.tflite")) == {"MUL", "ADD", "TANH"}
