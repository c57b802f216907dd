"""Core ML: coremltools' ML Program, the MIL reference executor for parity on Linux, ANE rules for coverage."""

from __future__ import annotations

from edgevit.export.backends import Backend
from edgevit.export.targets import Accelerator, Target

BACKEND = Backend(
    Target(
        name="coreml",
        suffix=".mlpackage",
        runtime="edgevit MIL reference executor (fp32 + fp16 modes); + Core ML prediction on macOS",
        converter="coremltools ML Program, iOS17 deployment target",
        module="backends.coreml.convert",
        requires=("coremltools",),
        extra="coreml",
        precisions=("fp16", "fp32", "int8", "w8", "w4"),
        default_precision="fp16",
        accelerators=(
            Accelerator("ane", "Apple Neural Engine (ComputeUnit.ALL / CPU_AND_NE)", 5,
                        "ANE rules over the MIL program; MLComputePlan on macOS"),
        ),
        precision_notes="fp16 is the ML Program default and the only precision the Neural Engine runs"
                        "; int8: activations calibrated by edgevit's MIL executor + int8 weights; w8/w4: linear_quantize_weights",
    ),
    # the passes each accelerator runs, in ORDER (export/passes/__init__.py)
    # ane: the generic rewrites, finite masks for fp16, static gathers, then the Neural Engine layout passes.
    pipelines={
        "ane": (
            "strip_aliases", "select_to_slice", "fold_constant_gathers", "fold_batchnorm", "fuse_gelu",
            "adaptive_pool_static", "unfold_fold_static", "pixel_unshuffle_rank4", "lower_rank",
            "sdpa_to_explicit", "einsum_to_matmul", "expand_to_broadcast", "finite_masks", "static_gather_scatter",
            "static_topk_select", "ane_channel_layer_norm", "ane_linear_to_conv", "ane_split_heads",
            "ane_cancel_transposes", "fold_scale_into_linear", "sink_slices",
        ),
    },
    packages=("coremltools",),
)
