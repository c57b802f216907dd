"""The parity comparison itself: it must fail on real differences and pass on rounding."""

from __future__ import annotations

import numpy as np
import pytest

from edgevit.export.parity import TOLERANCES, compare, compare_output


def _logits(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(3, 1000)).astype(np.float32)


def test_fp32_rounding_passes() -> None:
    ref = _logits()
    out = ref * (1 + np.float32(3e-7))
    r = compare_output("logits", ref, out, TOLERANCES["fp32"])
    assert r.passed and r.top1_agreement == 1.0 and r.top5_agreement == 1.0


def test_fp32_rejects_an_error_fp16_accepts() -> None:
    ref = _logits()
    out = (ref.astype(np.float16)).astype(np.float32)  # exactly fp16 rounding
    assert not compare_output("logits", ref, out, TOLERANCES["fp32"]).passed
    assert compare_output("logits", ref, out, TOLERANCES["fp16"]).passed


def test_wrong_output_fails_even_fp16() -> None:
    ref = _logits()
    out = _logits(seed=1)
    r = compare_output("logits", ref, out, TOLERANCES["fp16"])
    assert not r.passed and r.cosine < 0.5


def test_top1_flip_on_clear_margin_fails() -> None:
    ref = np.zeros((1, 10), np.float32)
    ref[0, 3] = 1.0
    out = ref.copy()
    out[0, 3], out[0, 4] = 0.0, 1.0
    r = compare_output("logits", ref, out, TOLERANCES["fp16"])
    assert r.top1_agreement == 0.0 and not r.passed  # the flip needs an error the bound rejects


def test_near_tie_flip_is_not_a_failure() -> None:
    ref = np.linspace(0, 1, 10, dtype=np.float32)[None].repeat(2, 0)
    ref[:, 8] = ref[:, 9] - 1e-7
    out = ref.copy()
    out[:, 8] += 2e-7  # flips the top-1 within rounding
    r = compare_output("logits", ref, out, TOLERANCES["fp32"])
    assert r.top1_agreement == 0.0 and r.passed  # rounding resolved a near-tie differently


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        compare_output("x", np.zeros((1, 4)), np.zeros((1, 5)), TOLERANCES["fp32"])


def test_report_covers_every_output() -> None:
    refs = [[np.ones((1, 4)), np.arange(6.0).reshape(1, 6)] for _ in range(2)]
    outs = [[np.ones((1, 4)), np.arange(6.0).reshape(1, 6) + 1] for _ in range(2)]
    report = compare(refs, outs, ["a", "b"], "fp32")
    assert report.status == "failed" and report.samples == 2
    assert [o.passed for o in report.outputs] == [True, False]
    assert report.worst("max_abs_err") == pytest.approx(1.0)
