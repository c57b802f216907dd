"""The `safe` int8 scheme on XNNPACK: which ops besides the matmuls run in int8, decided per model.

Matmul-only int8 (the ``safe`` scheme everywhere else) puts a QUANTIZE before and a DEQUANTIZE after each
convolution and fully-connected op. In a convolutional network that is most of the graph's memory traffic:
MobileViT-v2-0.5 had 117 conversions, and its conv -> SiLU -> depthwise conv -> SiLU -> conv chains went
int8 -> float -> int8 at every step. XNNPACK has int8 kernels for the ops between the matmuls too (logistic,
multiply, and the data-movement ops), so those can stay int8 and the conversions go away. The residual ADDs
stay float, as ``safe`` promises: quantized too, they cost MobileViT-v2-0.5 another 2.7 dB of SQNR (34.2 ->
31.5 dB on seeded inputs) for no measurable speed (3.28 vs 3.33 ms).

Two rules decide it:

1. **Regions, never islands.** An op of :data:`XNNPACK_INT8_OPS` is quantized only when it is connected to an
   int8 matmul through a chain of such ops (activation tensors, either direction). A lone int8 op between
   float ops only adds two conversions.
2. **Measured, then kept or rolled back.** The widened artifact is kept only when its error against the fp32
   model is at most twice the matmul-only artifact's error power (SQNR no more than 3 dB lower), per output,
   on the check samples: the ops between the matmuls may add no more noise than the matmuls' quantization
   already does. Otherwise the matmul-only artifact is written and the manifest says why (DeiT-Tiny with
   seeded weights: 27.6 dB matmul-only, 15.0 dB with its reshapes, transposes and class-token concatenation
   int8: rolled back).

Measured (2-core AMD EPYC with avx512_vnni, LiteRT 2.3.0, interleaved 16 rounds x 15 runs):
MobileViT-v2-0.5 fp32 6.54 ms, matmul-only int8 5.03 ms (1.30x), widened 3.33 ms (1.95x), SQNR 35.5 vs
34.2 dB, one XNNPACK partition.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: ops XNNPACK runs with int8 kernels that sit between matmuls (AEQ operation names)
XNNPACK_INT8_OPS = ("LOGISTIC", "MUL", "RESHAPE", "TRANSPOSE", "SLICE", "STRIDED_SLICE", "PAD",
                    "CONCATENATION")
#: how much the widening may raise the error power over the matmul-only artifact's (3.01 dB)
MAX_NOISE_RATIO = 2.0
#: calibration samples the widened and the matmul-only artifacts are compared on
CHECK_SAMPLES = 8


@dataclass
class Region:
    """The ops to quantize besides the matmuls: their AEQ scopes and op names, and counts by op type."""

    scopes: list[tuple[str, str]] = field(default_factory=list)  # (scope, AEQ operation name)

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(op for _, op in self.scopes).items()))


def int8_region(fp32_artifact: Path, matmul_ops: Sequence[str]) -> Region:
    """The :data:`XNNPACK_INT8_OPS` ops of ``fp32_artifact`` connected to a matmul op (rule 1 of the module doc).

    Ops are named by their AEQ scope (output tensor names); an op whose scope another op shares is left out,
    since a recipe could not select it alone."""
    from edgevit.export.backends.tflite.coverage import _read_tflite

    g = _read_tflite(Path(fp32_artifact))
    names = [_aeq_name(op.name) for op in g.ops]
    matmul = set(matmul_ops)
    member = [i for i, n in enumerate(names) if n in matmul or n in XNNPACK_INT8_OPS]
    root = _components(g, member)
    with_matmul = {root[i] for i in member if names[i] in matmul}
    scopes = [_scope(g, op) for op in g.ops]
    shared = {s for s, n in Counter(scopes).items() if n > 1}
    return Region([(scopes[i], names[i]) for i in member
                   if names[i] in XNNPACK_INT8_OPS and root[i] in with_matmul and scopes[i] not in shared])


def region_recipe(static_rule: dict[str, Any], region: Region) -> list[dict[str, Any]]:
    """AEQ recipe rules quantizing exactly the region's ops: one rule per op type, its regex the alternation of
    the anchored scopes (AEQ tries every rule's regex on every op of every calibration sample: with one rule
    per op instance DeepViT-16's int8 quantization took 18.8 s, with one per op type 12.5 s)."""
    by_op: dict[str, list[str]] = {}
    for scope, op in region.scopes:
        by_op.setdefault(op, []).append(re.escape(scope))
    return [dict(static_rule, regex=f"^(?:{'|'.join(scopes)})$", operation=op) for op, scopes in by_op.items()]


def widening_cost(reference: Sequence[np.ndarray], narrow: Sequence[np.ndarray],
                  wide: Sequence[np.ndarray]) -> str | None:
    """Rule 2: None when every output's error power of ``wide`` is at most :data:`MAX_NOISE_RATIO` times
    ``narrow``'s; else which output broke it, with its SQNR matmul-only and widened."""
    from edgevit.export.quantization.passes import output_powers, worst_sqnr_db

    if len(wide) != len(narrow):
        return f"{len(wide)} outputs instead of {len(narrow)}"
    pairs = zip(output_powers(reference, narrow), output_powers(reference, wide), wide)
    for k, (before, after, out) in enumerate(pairs):
        if after[1] == math.inf:  # output_powers' mark of a wrong shape or a non-finite value
            return f"output {k}: shape {tuple(out.shape)} or a non-finite value"
        if after[1] > MAX_NOISE_RATIO * before[1]:
            return (f"output {k}: SQNR {worst_sqnr_db([before]):.1f} -> {worst_sqnr_db([after]):.1f} dB vs fp32, "
                    f"more than {10 * np.log10(MAX_NOISE_RATIO):.0f} dB lower")
    return None


def widen(fp32_artifact: Path, out: Path, wide: list[dict[str, Any]], ranges: Any, region: Region,
          calibration: Sequence[Sequence[np.ndarray]]) -> dict[str, Any]:
    """Quantize the widened recipe next to the matmul-only artifact at ``out`` and replace it when it keeps the
    accuracy (rule 2); a widening that fails to quantize or run is rolled back, never an error. Returns the
    manifest's record (:func:`record`). ``ranges``: AEQ's calibrated ranges of the widened recipe."""
    from ai_edge_quantizer import quantizer

    from edgevit.export.backends.tflite.qdq_passes import TfliteExecutor

    samples = list(calibration)[:CHECK_SAMPLES]
    executor = TfliteExecutor(fp32_artifact, samples)
    staged = out.with_name(out.stem + ".widened" + out.suffix)
    reference = narrow = widened = failure = None
    try:
        try:
            reference, narrow = executor.reference(), executor.outputs_of(out)
            quantizer.Quantizer(str(fp32_artifact), wide).quantize(ranges).export_model(str(staged), overwrite=True)
            widened = executor.outputs_of(staged)
            failure = widening_cost(reference, narrow, widened)
        except Exception as exc:
            failure, widened = f"{type(exc).__name__}: {exc}", None
        if failure is None:
            os.replace(staged, out)
    finally:
        staged.unlink(missing_ok=True)
    return record(region, failure, _worst_sqnr(reference, narrow), _worst_sqnr(reference, widened), len(samples))


def record(region: Region, failure: str | None, before: float | None, after: float | None,
           samples: int) -> dict[str, Any]:
    """The manifest's ``quantization.int8_region``: kept or rolled back (``failure``: why, one line), the ops, the
    worst output's SQNR against fp32 of both artifacts, and a note for the export table."""
    ops = ", ".join(f"{n} {k}" for k, n in region.counts().items())
    failure = failure.strip().splitlines()[0][:300] if failure else None
    if failure is None:
        note = (f"XNNPACK int8 regions: also quantized {ops} (joined to the int8 matmuls); SQNR vs fp32 "
                f"{before:.1f} dB matmul-only, {after:.1f} dB widened: kept")
    else:
        note = f"XNNPACK int8 regions: widening to {ops} rolled back ({failure}); matmul-only int8 kept"
    return {"kept": "widened" if failure is None else "matmul-only", "ops": region.counts(),
            "sqnr_matmul_only_db": before, "sqnr_widened_db": after, "samples": samples,
            "rolled_back_because": failure, "note": note}


def _worst_sqnr(reference: Sequence[np.ndarray] | None, outs: Sequence[np.ndarray] | None) -> float | None:
    """The worst output's SQNR against fp32, dB (None when either is missing)."""
    from edgevit.export.quantization.passes import output_powers, worst_sqnr_db

    return None if outs is None or reference is None else worst_sqnr_db(output_powers(reference, outs))


def _aeq_name(litert_name: str) -> str:
    """AEQ's operation name of a LiteRT op (they differ for the transposed convolution only)."""
    return "CONV_2D_TRANSPOSE" if litert_name == "TRANSPOSE_CONV" else litert_name


def _scope(g: Any, op: Any) -> str:
    """AEQ's op scope: the op's output tensor names joined by ';', with a trailing ';'."""
    names = [g.tensors[t].name for t in op.outputs if t >= 0 and g.tensors[t].name]
    return ";".join(names) + ";" if names else ""


def _components(g: Any, member: list[int]) -> dict[int, int]:
    """Union-find over ``member`` ops joined by a tensor one produces and another reads: op -> its root."""
    parent = {i: i for i in member}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    producer = {t: i for i in member for t in g.ops[i].outputs if t >= 0}
    for i in member:
        for t in g.ops[i].inputs:
            j = producer.get(t)
            if j is not None:
                parent[find(i)] = find(j)
    return {i: find(i) for i in member}
