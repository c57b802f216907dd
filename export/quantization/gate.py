"""The parity gate of a quantized artifact: SQNR and decisive agreement, with bounds from the arithmetic.

fp32/fp16 artifacts are judged by rounding bounds (:mod:`edgevit.export.parity`); a quantized artifact
differs from the fp32 model by design, so it is judged by how much noise its quantizers may add.

**One quantizer.** Symmetric b-bit quantization of a tensor whose peak is ``c`` times its RMS (the crest
factor) has step ``peak / (2**(b-1) - 1)`` and uniform rounding noise of variance step**2/12, so its
signal-to-quantization-noise ratio is ``SQNR_1 = 10 log10(12 (2**(b-1)-1)**2 / c**2)`` dB:

- int8 activations (per tensor): heavy-tailed transformer activations, clipped at a calibration
  percentile, have c <= 8 -> 52.9 - 18.1 = 34.8 dB;
- int8 weights (per output channel): the largest of >= 64 near-Gaussian values, c <= 4 -> 40.8 dB;
- 4-bit weights (per block of 32, or a 16-entry palette): levels +-7, c <= 2.5 -> 27.7 - 8.0 = 19.7 dB.

**A network.** Each quantized op adds one weight quantizer (and for int8 one activation quantizer);
independent noises add in power, and normalisations and residual paths keep noise roughly at the same
relative level from where it enters to the output. So the output's SQNR is about
``-10 log10(sum_i 10**(-SQNR_i/10))``. We allow 6 dB (4x in noise power) for amplification along the
way: :func:`required_sqnr_db`. The bound never goes below 0 dB (error power no larger than the
signal's): deep w4 models can predict less than that, and an artifact whose error outweighs its signal
is not the same model, whatever its accuracy on one data set. A wrong scale, a swapped zero point or a float op fed integers is
0 dB or worse, far below any of these bounds.

**Agreement.** Top-1 can only flip where the fp32 margin (top-1 minus runner-up logit) is within reach
of the noise: the difference of two logits' noise has RMS sqrt(2) sigma. A sample whose margin exceeds
4 sqrt(2) sigma (sigma: the measured RMS error of the logits) is *decisive*; at 4 standard deviations a
flip has probability < 1e-4 for Gaussian noise, so at most 1% of decisive samples may flip (the rest is
slack for non-Gaussian tails). Near-ties are reported, not gated.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

CREST = {"activation": 8.0, "weight8": 4.0, "weight4": 2.5}
AMPLIFICATION_DB = 6.0
DECISIVE_SIGMAS = 4.0
MAX_DECISIVE_FLIPS = 0.01


def quantizer_sqnr_db(bits: int, crest: float) -> float:
    """SQNR of one symmetric ``bits``-bit quantizer on a signal with the given crest factor."""
    levels = 2 ** (bits - 1) - 1
    return 10 * math.log10(12 * levels**2 / crest**2)


def required_sqnr_db(precision: str, quantized_ops: int) -> float:
    """The least output SQNR an artifact with ``quantized_ops`` quantized ops must reach (see module doc)."""
    n = max(quantized_ops, 1)
    weight = quantizer_sqnr_db(4, CREST["weight4"]) if precision == "w4" else quantizer_sqnr_db(8, CREST["weight8"])
    noise = n * 10 ** (-weight / 10)
    if precision == "int8":
        noise += n * 10 ** (-quantizer_sqnr_db(8, CREST["activation"]) / 10)
    return max(-10 * math.log10(noise) - AMPLIFICATION_DB, 0.0)


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    """10 log10(signal power / error power); +inf when identical."""
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    noise = float(np.mean((out64 - ref64) ** 2))
    signal = float(np.mean(ref64**2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def decisive_agreement(ref: np.ndarray, out: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement over all samples and over the decisive ones (rows of 2-D logits; see module doc)."""
    ref2, out2 = ref.reshape(-1, ref.shape[-1]).astype(np.float64), out.reshape(-1, out.shape[-1]).astype(np.float64)
    agree = ref2.argmax(-1) == out2.argmax(-1)
    sigma = float(np.sqrt(np.mean((out2 - ref2) ** 2)))
    top2 = np.sort(ref2, axis=-1)[:, -2:] if ref2.shape[-1] > 1 else np.zeros((len(ref2), 2))
    margin = top2[:, 1] - top2[:, 0]
    decisive = margin > DECISIVE_SIGMAS * math.sqrt(2) * sigma
    n_dec = int(decisive.sum())
    flips = int((~agree & decisive).sum())
    return {
        "agreement": float(agree.mean()),
        "decisive": n_dec,
        "decisive_flips": flips,
        "decisive_ok": n_dec == 0 or flips <= MAX_DECISIVE_FLIPS * n_dec,
    }
