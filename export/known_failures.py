"""Known failures: (model, target) -> why that export does not pass today.

The zoo matrix test (tests/test_zoo_matrix.py) reads this table: a listed cell must still fail (so a
fix forces its row out), an unlisted cell must pass. Nothing is skipped silently. The op-substitution
passes (issue 4) exist to empty this table.
"""

from __future__ import annotations

KNOWN_FAILURES: dict[tuple[str, str], str] = {
    ("filtervit_xxs", "coreml"): (
        "coremltools conversion does not finish (>28 min): the MIL optimisation passes crawl over the "
        "non-integer adaptive average pools 110->20->110 (about 10 s per pass for the 20x20 block)"
    ),
}


def known_failure(model: str, target: str) -> str | None:
    """The recorded reason ``model`` fails on ``target``, or None if it is expected to pass."""
    return KNOWN_FAILURES.get((model, target))
