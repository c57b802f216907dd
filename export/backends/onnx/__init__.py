"""ONNX: torch.onnx's dynamo exporter, onnxruntime for parity and latency, the mobile checkers for coverage."""

from __future__ import annotations

from edgevit.export.backends import Backend
from edgevit.export.targets import Accelerator, Target

BACKEND = Backend(
    Target(
        name="onnx",
        suffix=".onnx",
        runtime="onnxruntime (CPUExecutionProvider)",
        converter="torch.onnx dynamo exporter (opset 18)",
        module="backends.onnx.convert",
        requires=("onnx", "onnxscript", "onnxruntime"),
        extra="onnx",
        precisions=("fp32", "fp16", "int8", "w8", "w4"),
        default_precision="fp32",
        accelerators=(
            Accelerator("cpu", "onnxruntime CPU execution provider", None, "onnxruntime session"),
            Accelerator("xnnpack", "onnxruntime XNNPACK execution provider", None,
                        "softmax on the last axis (XNNPACK EP rule)"),
            Accelerator("nnapi", "Android NNAPI execution provider", 4,
                        "onnxruntime mobile usability checker (NNAPI)"),
            Accelerator("coreml", "Core ML execution provider (MLProgram)", 5,
                        "onnxruntime mobile usability checker (CoreML MLProgram)"),
        ),
        precision_notes="fp16: float16 graph with fp32 inputs/outputs (onnxruntime float16 converter)"
                        "; int8: onnxruntime quantize_static (QDQ, s8s8, per-channel); w8/w4: int8 / 4-bit weights",
    ),
    # the passes each accelerator runs, in ORDER (export/passes/__init__.py)
    # cpu/xnnpack/coreml: the generic rewrites (+ fuse_gelu: onnxruntime fuses one Gelu); xnnpack: its softmax
    # rule; nnapi: rank <= 4 and NNAPI's op set (decomposed norms, tanh GELU, static gathers); coreml EP: static
    # shapes and gathers for MLProgram.
    pipelines={
        "cpu": (
            "strip_aliases", "select_to_slice", "fold_constant_gathers", "fold_batchnorm", "fuse_gelu",
            "adaptive_pool_static", "unfold_fold_static", "pixel_unshuffle_rank4", "lower_rank",
            "sdpa_to_explicit", "einsum_to_matmul", "expand_to_broadcast", "fold_scale_into_linear", "sink_slices",
        ),
        "xnnpack": (
            "strip_aliases", "select_to_slice", "fold_constant_gathers", "fold_batchnorm", "fuse_gelu",
            "adaptive_pool_static", "unfold_fold_static", "pixel_unshuffle_rank4", "lower_rank",
            "sdpa_to_explicit", "einsum_to_matmul", "expand_to_broadcast", "softmax_last_axis",
            "fold_scale_into_linear", "sink_slices",
        ),
        "nnapi": (
            "strip_aliases", "select_to_slice", "fold_constant_gathers", "fold_batchnorm", "adaptive_pool_static",
            "upsample_static", "unfold_fold_static", "pixel_unshuffle_rank4", "lower_rank", "sdpa_to_explicit",
            "einsum_to_matmul", "expand_to_broadcast", "gelu_tanh", "decompose_group_norm", "decompose_layer_norm",
            "decompose_vector_norm", "sum_to_mean", "static_gather_scatter", "static_topk_select",
            "fold_scale_into_linear", "sink_slices",
        ),
        "coreml": (
            "strip_aliases", "select_to_slice", "fold_constant_gathers", "fold_batchnorm", "fuse_gelu",
            "adaptive_pool_static", "upsample_static", "unfold_fold_static", "pixel_unshuffle_rank4", "lower_rank",
            "sdpa_to_explicit", "einsum_to_matmul", "expand_to_broadcast", "decompose_vector_norm",
            "static_gather_scatter", "static_topk_select", "fold_scale_into_linear", "sink_slices",
        ),
    },
    packages=("onnx", "onnxscript", "onnx-ir", "onnxruntime"),
)
