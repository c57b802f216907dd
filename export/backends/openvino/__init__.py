"""OpenVINO: openvino.convert_model to IR, the OpenVINO runtime for parity and latency, query_model for coverage."""

from __future__ import annotations

from edgevit.export.backends import Backend
from edgevit.export.targets import Accelerator, Target

BACKEND = Backend(
    Target(
        name="openvino",
        suffix=".xml",
        runtime="OpenVINO CPU, inference precision forced to f32",
        converter="openvino.convert_model (IR .xml + .bin)",
        module="backends.openvino.convert",
        requires=("openvino",),
        extra="openvino",
        precisions=("fp32", "fp16", "int8", "w8", "w4"),
        default_precision="fp32",
        accelerators=(
            Accelerator("cpu", "OpenVINO CPU plugin", None, "Core.query_model"),
            Accelerator("gpu", "OpenVINO GPU plugin (f16 by default)", None, "Core.query_model if present"),
            Accelerator("npu", "OpenVINO NPU plugin (static shapes, f16)", None,
                        "Core.query_model if present + static-shape rules"),
        ),
        precision_notes="fp16: IR weights compressed to float16; inference precision as OpenVINO reports it"
                        "; int8: NNCF quantize; w8/w4: NNCF compress_weights",
    ),
    # the passes each accelerator runs, in ORDER (export/passes/__init__.py)
    # cpu: the fused projection splits, Linear and 1x1 conv (measured faster); gpu/npu: finite masks for their f16 arithmetic.
    pipelines={
        "cpu": (
            "strip_aliases", "select_to_slice", "fold_constant_gathers", "fold_batchnorm", "fuse_gelu",
            "adaptive_pool_static", "unfold_fold_static", "pixel_unshuffle_rank4", "lower_rank",
            "sdpa_to_explicit", "einsum_to_matmul", "expand_to_broadcast", "split_fused_projection",
            "split_fused_conv_projection", "fold_scale_into_linear", "sink_slices",
        ),
        "gpu": (
            "strip_aliases", "select_to_slice", "fold_constant_gathers", "fold_batchnorm", "fuse_gelu",
            "adaptive_pool_static", "unfold_fold_static", "pixel_unshuffle_rank4", "lower_rank",
            "sdpa_to_explicit", "einsum_to_matmul", "expand_to_broadcast", "finite_masks",
            "fold_scale_into_linear", "sink_slices",
        ),
        "npu": (
            "strip_aliases", "select_to_slice", "fold_constant_gathers", "fold_batchnorm", "fuse_gelu",
            "adaptive_pool_static", "unfold_fold_static", "pixel_unshuffle_rank4", "lower_rank",
            "sdpa_to_explicit", "einsum_to_matmul", "expand_to_broadcast", "finite_masks",
            "fold_scale_into_linear", "sink_slices",
        ),
    },
    packages=("openvino",),
)
