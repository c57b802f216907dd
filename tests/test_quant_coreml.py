"""Core ML quantization (export/backends/coreml/quantize.py): coremltools.optimize on an exported fp32
.mlpackage, every quantized package run by edgevit's MIL reference executor and judged against the fp32
package by the SQNR gate (export/quantization/gate.py) on held-out inputs.

The model is a seeded tiny ViT (Conv2d patch embedding, 2 pre-norm blocks of nn.MultiheadAttention and
a GELU MLP with residual adds, head Linear), exported with the ANE passes (its Linear layers become 1x1
convs: 10 convs in the program).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgevit.errors import EdgevitError
from edgevit.export.backends.coreml.mil import MILExecutor, load_program
from edgevit.export.quantization import INFO_KEYS, OPTIONAL_INFO_KEYS, QuantSpec
from edgevit.export.quantization.gate import required_sqnr_db, sqnr_db

ct = pytest.importorskip("coremltools")
from edgevit.export.backends.coreml import quantize as cq  # noqa: E402

DIM, MLP, CONVS = 128, 512, 10


def images(n: int, seed: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal((1, 3, 16, 16)).astype(np.float32)] for _ in range(n)]


@pytest.fixture(scope="module")
def fp32_package(tmp_path_factory, seeded_vit) -> Path:
    from edgevit.api import export_model

    # conftest's seeded ViT, no position embedding, PyTorch's default initialisation
    model = seeded_vit(DIM, mlp=MLP, pos_embed=False, perturb=False)
    out = tmp_path_factory.mktemp("coreml_fp32")
    return export_model(model, (torch.randn(1, 3, 16, 16),), target="coreml", out=out, precision="fp32",
                        passes="auto").artifact


@pytest.fixture(scope="module")
def calibration() -> list[list[np.ndarray]]:
    return images(32, seed=1)


@pytest.fixture(scope="module")
def held_out(fp32_package) -> tuple[list[list[np.ndarray]], np.ndarray]:
    samples = images(16, seed=2)
    executor = MILExecutor(load_program(fp32_package), "fp32")
    return samples, np.concatenate([executor.run(s)[0] for s in samples])


def outputs(package: Path, samples: list[list[np.ndarray]]) -> np.ndarray:
    executor = MILExecutor(load_program(package), "fp32")
    return np.concatenate([executor.run(s)[0] for s in samples])


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def interface(path: Path) -> list:
    spec = ct.utils.load_spec(str(path))
    return [(d.name, d.type.multiArrayType.dataType, list(d.type.multiArrayType.shape))
            for d in [*spec.description.input, *spec.description.output]]


def check_common(info: dict, package: Path, fp32_package: Path, held_out, precision: str) -> float:
    """INFO_KEYS, the fp32 interface kept, and output SQNR over the bound; returns the SQNR."""
    assert tuple(k for k in info if k not in OPTIONAL_INFO_KEYS) == INFO_KEYS
    assert interface(package) == interface(fp32_package)  # float32 in, float32 out, same names and shapes
    samples, ref = held_out
    measured = sqnr_db(ref, outputs(package, samples))
    assert measured >= required_sqnr_db(precision, sum(info["quantized_ops"].values())), measured
    return measured


def test_precisions_and_vendor_patterns() -> None:
    assert set(cq.PRECISIONS) == {"int8", "w8", "w4"}
    from coremltools.converters.mil.mil.passes.defs.optimize_activation_quantization import (
        insert_suffix_quantize_dequantize_pair,
    )
    from coremltools.optimize.coreml._quantization_passes import insert_prefix_quantize_dequantize_pair

    # count_ops judges activation quantization by coremltools' own pattern lists: they must not drift
    assert set(cq.ACTIVATION_PATTERNS) == set(insert_prefix_quantize_dequantize_pair.SUPPORTED_OP_TYPES)
    assert set(cq.FUSED_ACTIVATIONS) == set(insert_suffix_quantize_dequantize_pair._allowed_activations)


def test_w8_quantizes_every_conv_weight_and_shrinks(fp32_package, held_out, tmp_path) -> None:
    out = tmp_path / "w8.mlpackage"
    info = cq.quantize(fp32_package, out, QuantSpec("w8"), [])
    check_common(info, out, fp32_package, held_out, "w8")
    assert info["activations"] == "float" and "linear_quantize_weights" in info["tool"]
    assert info["quantized_ops"] == {"conv": CONVS}
    assert info["float_ops"]["layer_norm"] == 5 and info["float_ops"]["softmax"] == 8
    assert info["float_ops"]["gelu"] == 2 and info["float_ops"]["add"] == 4
    ops = load_program(out).op_types()
    assert ops["constexpr_affine_dequantize"] == CONVS and "quantize" not in ops
    assert size(out) <= 0.30 * size(fp32_package), size(out) / size(fp32_package)


def test_w4_palettizes_on_ios17(fp32_package, held_out, tmp_path) -> None:
    out = tmp_path / "w4.mlpackage"
    info = cq.quantize(fp32_package, out, QuantSpec("w4"), [])
    check_common(info, out, fp32_package, held_out, "w4")
    # edgevit's packages target iOS17, where coremltools refuses int4 per-block: the palette fallback ran
    assert "palettize_weights" in info["tool"] and any("supported since iOS18" in n for n in info["notes"])
    assert info["quantized_ops"] == {"conv": CONVS}
    program = load_program(out)
    luts = [program.consts[s.inputs["lut"].name] for s in program.steps if s.op_type == "constexpr_lut_to_dense"]
    assert len(luts) == CONVS and all(lut.shape == (16,) for lut in luts)
    assert size(out) <= 0.20 * size(fp32_package)


def test_w4_per_block_on_an_ios18_package(tmp_path) -> None:
    from coremltools.converters.mil import Builder as mb

    rng = np.random.default_rng(0)
    conv_w = (rng.standard_normal((64, 64, 1, 1)) / 8).astype(np.float32)
    w1, w2 = (rng.standard_normal((128, 64)) / 8).astype(np.float32), (rng.standard_normal((64, 128)) / 11).astype(
        np.float32)

    @mb.program(input_specs=[mb.TensorSpec((1, 64, 4, 4))], opset_version=ct.target.iOS18)
    def prog(x):
        t = mb.transpose(x=mb.reshape(x=mb.conv(x=x, weight=conv_w), shape=[1, 64, 16]), perm=[0, 2, 1])
        return mb.add(x=t, y=mb.linear(x=mb.gelu(x=mb.linear(x=t, weight=w1)), weight=w2))

    fp32 = tmp_path / "ios18.mlpackage"
    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
               compute_precision=ct.precision.FLOAT32, skip_model_load=True).save(str(fp32))
    out = tmp_path / "w4.mlpackage"
    info = cq.quantize(fp32, out, QuantSpec("w4"), [])
    samples = [[rng.standard_normal((1, 64, 4, 4)).astype(np.float32)] for _ in range(4)]
    measured = sqnr_db(outputs(fp32, samples), outputs(out, samples))
    assert measured >= required_sqnr_db("w4", 3), measured
    assert "int4, per_block 32" in info["tool"] and info["quantized_ops"] == {"conv": 1, "linear": 2}
    program = load_program(out)
    blocks = [s for s in program.steps if s.op_type == "constexpr_blockwise_shift_scale"]
    assert len(blocks) == 3
    for step in blocks:  # int4 (stored one per int8) with one scale per 32 input channels
        data, scale = program.consts[step.inputs["data"].name], program.consts[step.inputs["scale"].name]
        assert data.min() >= -8 and data.max() <= 7 and scale.shape[1] == data.shape[1] // 32


@pytest.mark.parametrize("scheme,method", [("safe", "percentile"), ("full", "minmax")])
def test_int8(fp32_package, calibration, held_out, tmp_path, scheme: str, method: str) -> None:
    out = tmp_path / "int8.mlpackage"
    info = cq.quantize(fp32_package, out, QuantSpec("int8", scheme, method), calibration)
    measured = check_common(info, out, fp32_package, held_out, "int8")
    assert "linear_quantize_activations" in info["tool"] and info["activations"].startswith("int8 per-tensor")
    assert ("percentile" in info["activations"]) == (method == "percentile")
    ops = load_program(out).op_types()
    assert ops["quantize"] >= 2 * CONVS and ops["constexpr_affine_dequantize"] == CONVS
    assert info["quantized_ops"]["conv"] == CONVS  # every conv reads int8 activations and int8 weights
    for kept_float in ("layer_norm", "softmax", "gelu", "einsum"):  # no coremltools pattern for these
        assert kept_float in info["float_ops"] and kept_float not in info["quantized_ops"]
    if scheme == "safe":  # residual adds stay float
        assert info["float_ops"]["add"] == 4 and "add" not in info["quantized_ops"]
    else:  # full: coremltools' add pattern too
        assert info["quantized_ops"]["add"] == 4 and "add" not in info["float_ops"]
    # the check can fail: the same package with its dequantize scales 4x off is far below the bound
    program = load_program(out)
    for step in program.steps:
        if step.op_type == "dequantize":
            program.consts[step.inputs["scale"].name] = program.consts[step.inputs["scale"].name] * 4
    executor, (samples, ref) = MILExecutor(program, "fp32"), held_out
    broken = sqnr_db(ref, np.concatenate([executor.run(s)[0] for s in samples]))
    assert broken < required_sqnr_db("int8", sum(info["quantized_ops"].values())) < measured


@pytest.mark.parametrize("scheme", ["safe", "full"])
def test_int8_pools_and_fused_activations(tmp_path, scheme: str) -> None:
    """conv -> relu -> avg_pool -> softmax: coremltools fuses relu into the conv's int8 pattern; its pool
    pattern is off under "safe" (the pool then computes in float) and on under "full"."""
    from coremltools.converters.mil import Builder as mb

    weight = (np.random.default_rng(0).standard_normal((16, 8, 3, 3)) / 8).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec((1, 8, 8, 8))], opset_version=ct.target.iOS17)
    def prog(x):
        pooled = mb.avg_pool(x=mb.relu(x=mb.conv(x=x, weight=weight)), kernel_sizes=[2, 2], strides=[2, 2],
                             pad_type="valid")
        return mb.softmax(x=pooled, axis=1)

    fp32, out = tmp_path / "cnn.mlpackage", tmp_path / "int8.mlpackage"
    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
               compute_precision=ct.precision.FLOAT32, skip_model_load=True).save(str(fp32))
    rng = np.random.default_rng(1)
    samples = [[rng.standard_normal((1, 8, 8, 8)).astype(np.float32)] for _ in range(12)]
    info = cq.quantize(fp32, out, QuantSpec("int8", scheme), samples[:8])
    pooled = {"safe": ({"conv": 1, "relu": 1}, {"avg_pool": 1, "softmax": 1}),
              "full": ({"avg_pool": 1, "conv": 1, "relu": 1}, {"softmax": 1})}[scheme]
    assert (info["quantized_ops"], info["float_ops"]) == pooled
    measured = sqnr_db(outputs(fp32, samples[8:]), outputs(out, samples[8:]))
    assert measured >= required_sqnr_db("int8", sum(info["quantized_ops"].values())), measured


def test_activation_ranges_cover_all_samples(fp32_package, calibration) -> None:
    program = load_program(fp32_package)
    samples = calibration[:6]
    minmax = cq.activation_ranges(program, samples, "minmax")
    percentile = cq.activation_ranges(program, samples, "percentile")
    stacked = np.stack([s[0] for s in samples])
    name = program.inputs[0]
    # over every sample (coremltools' own recorder keeps only the last sample's range)
    assert minmax[name] == {"rmin": float(stacked.min()), "rmax": float(stacked.max())}
    clip = np.percentile(np.abs(stacked), cq.PERCENTILE)
    assert percentile[name]["rmax"] == pytest.approx(min(stacked.max(), clip), rel=1e-6)
    assert percentile[name]["rmin"] == pytest.approx(max(stacked.min(), -clip), rel=1e-6)
    for tensor, stats in minmax.items():  # percentile ranges lie inside the min/max ones
        assert minmax[tensor]["rmin"] <= percentile[tensor]["rmin"] <= percentile[tensor]["rmax"] <= stats["rmax"]
    # a concat's inputs and output share one range (coremltools' concat adjustment)
    concat = next(s for s in program.steps if s.op_type == "concat")
    ranges = {(minmax[r.name]["rmin"], minmax[r.name]["rmax"]) for r in concat.inputs["values"]}
    assert ranges == {(minmax[concat.outputs[0]]["rmin"], minmax[concat.outputs[0]]["rmax"])}


@pytest.mark.parametrize("total", [1, 7, 1000, 123457])
def test_percentile_from_largest_values(total: int) -> None:
    values = np.abs(np.random.default_rng(total).standard_normal(total))
    keep = cq._order_statistics_needed(total, cq.PERCENTILE)
    top = np.sort(values)[::-1][:keep]
    assert cq.percentile_of_top(top, total, cq.PERCENTILE) == pytest.approx(np.percentile(values, cq.PERCENTILE))


def test_unsupported_requests_are_one_line_errors(fp32_package, calibration, tmp_path) -> None:
    with pytest.raises(EdgevitError) as entropy:
        cq.quantize(fp32_package, tmp_path / "e.mlpackage", QuantSpec("int8", method="entropy"), calibration)
    assert str(entropy.value) == ("Core ML int8 cannot calibrate with 'entropy': coremltools calibrates activation "
                                  "ranges by min/max only; use --calibration-method percentile or minmax")
    with pytest.raises(EdgevitError, match="needs calibration samples") as empty:
        cq.quantize(fp32_package, tmp_path / "n.mlpackage", QuantSpec("int8"), [])
    assert "\n" not in str(empty.value)
    assert not (tmp_path / "e.mlpackage").exists() and not (tmp_path / "n.mlpackage").exists()
