"""TFLite / LiteRT: litert-torch, the LiteRT interpreter for parity and latency, delegate rules for coverage."""

from __future__ import annotations

from edgevit.export.backends import Backend
from edgevit.export.targets import Accelerator, Target

BACKEND = Backend(
    Target(
        name="tflite",
        suffix=".tflite",
        runtime="LiteRT interpreter (ai-edge-litert, XNNPACK)",
        converter="litert-torch",
        module="backends.tflite.convert",
        requires=("litert_torch", "ai_edge_litert", "ai_edge_quantizer"),
        extra="tflite",
        precisions=("fp32", "fp16", "int8", "w8", "w4"),
        default_precision="fp32",
        accelerators=(
            Accelerator("xnnpack", "LiteRT CPU with the XNNPACK delegate", 6, "LiteRT interpreter"),
            Accelerator("gpu", "LiteRT GPU delegate", 4,
                        "TensorFlow Lite analyzer (gpu_compatibility) + rank<=4 / batch 1 scan"),
            Accelerator("nnapi", "LiteRT NNAPI delegate", 4, "rank<=4 scan + NNAPI op list"),
        ),
        precision_notes="fp16: float16 weights dequantized at load (ai-edge-quantizer float casting)"
                        "; int8: ai-edge-quantizer static wi8/ai8; w8/w4: weight-only wi8/wi4",
        converter_input="module",  # litert-torch exports the module itself
    ),
    # the passes each accelerator runs, in ORDER (export/passes/__init__.py)
    # every LiteRT delegate: nearest down-sampling as slices, softmax on the last axis without inner unit
    # dims; xnnpack: group norm decomposed (litert-torch's own lowering has a BROADCAST_TO that XNNPACK does
    # not take: MobileViT-v2-0.5 int8 in 22 pieces, 1.04x faster in one; fp32 the same), the fused
    # projection split (measured faster); gpu: finite masks, group norm decomposed, static gathers; nnapi: as
    # onnx:nnapi, then the norms' Sqrt + Div as Rsqrt + Mul.
    pipelines={
        "xnnpack": (
            "strip_aliases", "select_to_slice", "fold_constant_gathers", "fold_batchnorm", "fuse_gelu",
            "adaptive_pool_static", "nearest_downsample_slice", "unfold_fold_static", "pixel_unshuffle_rank4",
            "lower_rank", "sdpa_to_explicit", "einsum_to_matmul", "expand_to_broadcast", "softmax_last_axis",
            "softmax_drop_unit_dims", "decompose_group_norm", "split_fused_projection", "fold_scale_into_linear",
            "sink_slices",
        ),
        "gpu": (
            "strip_aliases", "select_to_slice", "fold_constant_gathers", "fold_batchnorm", "fuse_gelu",
            "adaptive_pool_static", "nearest_downsample_slice", "unfold_fold_static", "pixel_unshuffle_rank4",
            "lower_rank", "sdpa_to_explicit", "einsum_to_matmul", "expand_to_broadcast", "finite_masks",
            "softmax_last_axis", "softmax_drop_unit_dims", "decompose_group_norm", "static_gather_scatter",
            "static_topk_select", "fold_scale_into_linear", "sink_slices",
        ),
        "nnapi": (
            "strip_aliases", "select_to_slice", "fold_constant_gathers", "fold_batchnorm", "adaptive_pool_static",
            "nearest_downsample_slice", "unfold_fold_static", "pixel_unshuffle_rank4", "lower_rank",
            "sdpa_to_explicit", "einsum_to_matmul", "expand_to_broadcast", "softmax_last_axis",
            "softmax_drop_unit_dims", "gelu_tanh", "decompose_group_norm", "decompose_layer_norm",
            "decompose_vector_norm", "sum_to_mean", "sqrt_div_to_rsqrt", "static_gather_scatter",
            "static_topk_select", "fold_scale_into_linear", "sink_slices",
        ),
    },
    packages=("litert-torch", "ai-edge-litert"),
)
