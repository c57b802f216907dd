"""TFLite/LiteRT target: litert-torch converts the captured program; fp16 via ai-edge-quantizer."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import torch

# float16 weights, dequantized to fp32 at load: TFLite's standard "fp16 quantization"; the GPU
# delegate then computes in fp16.
FP16_WEIGHTS_RECIPE = [
    {
        "regex": ".*",
        "operation": "*",
        "algorithm_key": "float_casting",
        "op_config": {
            "weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"},
            "compute_precision": "FLOAT",
            "explicit_dequantize": True,
        },
    }
]


def convert(source: torch.export.ExportedProgram | torch.nn.Module, example_inputs: tuple, out: Path,
            precision: str) -> Path:
    """Write ``out`` (.tflite) from the rewritten model (the targets table hands it the module), or from a
    captured program's graph module."""
    import litert_torch

    # litert-torch takes a module and runs torch.export itself, so the exporter hands it the rewritten
    # graph module rather than capturing it first (the same graph either way).
    module = source.module() if isinstance(source, torch.export.ExportedProgram) else source
    edge_model = litert_torch.convert(module, example_inputs)
    if precision == "fp32":
        edge_model.export(str(out))
        return out
    fp32_path = out.with_name(out.stem + ".fp32.tflite")
    edge_model.export(str(fp32_path))
    _cast_weights_fp16(fp32_path, out)
    fp32_path.unlink()
    return out


def _cast_weights_fp16(src: Path, dst: Path) -> None:
    from ai_edge_quantizer import quantizer

    q = quantizer.Quantizer(str(src))
    q.load_quantization_recipe(FP16_WEIGHTS_RECIPE)
    q.quantize().export_model(str(dst), overwrite=True)


def versions() -> dict[str, str]:
    names = ("torch", "litert-torch", "litert-converter", "ai-edge-litert", "ai-edge-quantizer")
    return {name: version(name) for name in names}
