"""LiteRT's int8 kernel floor of a zoo model: the time XNNPACK's int8 kernels take for the model's own
convolutions and Linear layers at their own shapes, with nothing else in the graph.

Why: the bench cannot profile LiteRT (its Python API has no op profiler), so "how close to the int8 GEMM
bound can this model get on LiteRT" needs its own measurement. Every ``nn.Conv2d``/``nn.Linear`` call of one
forward pass is recorded with its input shape; a module applies each layer to its own input (NHWC for
convolutions, so litert-torch's layout pass leaves no TRANSPOSE), and the .tflite is quantized with
ai-edge-quantizer's static int8 recipe on every op *including the model's inputs and outputs*: an
int8-in/int8-out graph of only CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED (and the PADs of strided
convolutions), no QUANTIZE/DEQUANTIZE. No runtime runs the model faster than its kernels, so the floor
over the int8 GEMM bound is the least "median / int8 bound" the model can reach on LiteRT.

Run: ``python benchmarks/int8_kernel_floor.py MODEL [--input-size N] [--threads 2] [--rounds 10 --runs 15]``;
prints one JSON line (model, GMACs of the layers, op counts, the CPU and its integer units, floor median ms,
per-round medians, versions).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def recorded_layers(model: nn.Module, size: int) -> list[tuple[nn.Module, tuple[int, ...]]]:
    """(layer, input shape) of every Conv2d/Linear call of one forward pass, in call order."""
    calls: list[tuple[nn.Module, tuple[int, ...]]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: calls.append((mod, tuple(inp[0].shape))))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    return calls


class IndependentLayers(nn.Module):
    """Each layer on its own input; convolutions take and give NHWC (the permutes cancel in litert-torch)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for layer, x in zip(self.layers, inputs):
            if isinstance(layer, nn.Conv2d):
                outs.append(layer(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
            else:
                outs.append(layer(x))
        return tuple(outs)


def nhwc(layer: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0], shape[2], shape[3], shape[1]) if isinstance(layer, nn.Conv2d) else shape


def int8_interface_artifact(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: Path) -> Path:
    """fp32 .tflite (no export passes), then AEQ static int8 on every op, the model's inputs/outputs too."""
    from ai_edge_quantizer import quantizer, recipe

    from edgevit.api import export_model
    from edgevit.export.backends.tflite import quantize as tflite_quantize
    from edgevit.export.quantization import QuantSpec

    fp32 = Path(export_model(module.eval(), inputs, target="tflite", out=out, precision="fp32",
                             passes="none").artifact)
    rng = np.random.default_rng(0)
    samples = [[rng.standard_normal(tuple(x.shape)).astype(np.float32) for x in inputs] for _ in range(4)]
    rules = recipe.static_wi8_ai8()  # one rule on every op: INPUT/OUTPUT included, so no QUANTIZE/DEQUANTIZE
    ranges = tflite_quantize.calibrate(fp32, rules, QuantSpec("int8", "full", "minmax"), samples)
    int8 = out / "kernels_int8.tflite"
    quantizer.Quantizer(str(fp32), rules).quantize(ranges).export_model(str(int8), overwrite=True)
    return int8


def median_ms(path: Path, threads: int, rounds: int, runs: int) -> list[float]:
    """Per-round medians of back-to-back invokes (no pause between rounds: see the bench's block warm-up)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(str(path), num_threads=threads)
    interpreter.allocate_tensors()
    rng = np.random.default_rng(1)
    for d in interpreter.get_input_details():
        interpreter.set_tensor(d["index"], rng.integers(-100, 100, d["shape"]).astype(d["dtype"]))
    for _ in range(10):
        interpreter.invoke()
    medians = []
    for _ in range(rounds):
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            interpreter.invoke()
            times.append((time.perf_counter() - start) * 1e3)
        medians.append(statistics.median(times))
    return medians


def main() -> None:
    from edgevit.devices.worker import cpu_facts, integer_units_text
    from edgevit.export.backends.tflite.quantize import count_ops
    from edgevit.registry import count_macs, create_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--input-size", type=int, default=None, help="default: the zoo entry's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    size = args.input_size or model.edgevit_info.input_size
    calls = recorded_layers(model, size)
    inputs = tuple(torch.randn(nhwc(layer, shape)) for layer, shape in calls)
    layers = IndependentLayers([layer for layer, _ in calls])
    with tempfile.TemporaryDirectory() as tmp:
        artifact = int8_interface_artifact(layers, inputs, Path(tmp))
        quantized, floating, conversions = count_ops(artifact)
        rounds = median_ms(artifact, args.threads, args.rounds, args.runs)
    result: dict[str, Any] = {
        "model": args.model, "input_size": size, "layers": len(calls),
        "gmacs": count_macs(layers, *inputs) / 1e9,
        "int8_ops": quantized, "float_ops": floating, "conversions": conversions, "threads": args.threads,
        "cpu": (cpu := cpu_facts())["model"], "cpu_flags": cpu["flags"],
        "integer_units": integer_units_text(cpu["flags"]), "floor_ms": statistics.median(rounds), "round_medians_ms": [round(m, 3) for m in rounds],
        "versions": {p: version(p) for p in ("torch", "litert-torch", "ai-edge-quantizer", "ai-edge-litert")}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
