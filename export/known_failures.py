"""Known failures: (model, target) -> why that export does not pass today.

The zoo matrix test (tests/test_zoo_matrix.py) reads this table: a listed cell must still fail (so a
fix forces its row out), an unlisted cell must pass. Nothing is skipped silently. The op-substitution
passes exist to empty this table.
"""

from __future__ import annotations

KNOWN_FAILURES: dict[tuple[str, str], str] = {
    # filtervit_xxs -> coreml (coremltools did not finish in 28 min on the non-integer adaptive pools
    # 110->20->110) converts with the adaptive_pool_static pass since.
    # Found by the zoo x 4 targets sweep (benchmarks/RESULTS.md); the CI matrix runs each family's smallest
    # model, the nightly every model on onnx and coreml, so no test runs this cell.
    ("glnet_stl_paramslot", "tflite"): "litert-torch 0.10's converter: 'operand #0 does not dominate this use' "
                                       "when a GLMix block's slot logits (slots from a parameter) are soft-maxed "
                                       "both directly and transposed; glnet_stl (pooled slots) converts",
}


# Third-party model code (tests/test_third_party.py: transformers' vision models and other code bases'
# idioms): (corpus name, target) -> the converter's own error. Read the same way as KNOWN_FAILURES.
THIRD_PARTY_KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def third_party_known_failure(name: str, target: str) -> str | None:
    """The recorded reason a third-party corpus model fails on ``target``, or None if it must pass."""
    return THIRD_PARTY_KNOWN_FAILURES.get((name, target))
