"""What quantization costs: accuracy on labelled data, and closeness to the fp32 model.

With labelled data (``--eval``): top-1/top-5 of the fp32 model and of the quantized artifact run in its
own runtime, the top-1 drop in points with a 95% paired-bootstrap interval (images resampled with
replacement, both models scored on the same resample, 2000 resamples, seeded: the interval says how much
of the drop is the luck of a small set), top-1 agreement with fp32, logit cosine and SQNR.
Without labels, agreement, cosine and SQNR against fp32 on the held-out samples (the parity gate's
numbers, :mod:`edgevit.export.quantization.gate`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgevit.export.quantization.gate import sqnr_db

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per image: whether the label is among the ``k`` highest scores."""
    k = min(k, logits.shape[-1])
    top = np.argsort(-logits, axis=-1)[:, :k]
    return (top == labels[:, None]).any(axis=1)


def drop_interval(ref_hits: np.ndarray, q_hits: np.ndarray) -> tuple[float, float]:
    """95% paired-bootstrap interval of the top-1 drop (points)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    n = len(ref_hits)
    idx = rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))
    drops = 100.0 * (ref_hits[idx].mean(axis=1) - q_hits[idx].mean(axis=1))
    low, high = np.percentile(drops, [2.5, 97.5])
    return float(low), float(high)


def cosine(ref: np.ndarray, out: np.ndarray) -> float:
    a, b = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


def closeness(ref: np.ndarray, out: np.ndarray) -> dict[str, Any]:
    """Agreement, cosine, SQNR of the artifact's logits against fp32's (``(images, classes)``)."""
    return {
        "top1_agreement": float(np.mean(ref.argmax(-1) == out.argmax(-1))),
        "cosine": cosine(ref, out),
        "sqnr_db": sqnr_db(ref, out),
    }


def accuracy_report(ref: np.ndarray, out: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The accuracy table's numbers for one artifact (``ref``/``out``: (images, classes) logits)."""
    ref_top1, q_top1 = topk_hits(ref, labels, 1), topk_hits(out, labels, 1)
    low, high = drop_interval(ref_top1, q_top1)
    return {
        "images": int(len(labels)),
        "fp32_top1": 100.0 * float(ref_top1.mean()),
        "fp32_top5": 100.0 * float(topk_hits(ref, labels, 5).mean()),
        "top1": 100.0 * float(q_top1.mean()),
        "top5": 100.0 * float(topk_hits(out, labels, 5).mean()),
        "top1_drop": 100.0 * float(ref_top1.mean() - q_top1.mean()),
        "top1_drop_ci95": [low, high],
    } | closeness(ref, out)
