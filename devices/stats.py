"""Latency statistics: summaries of timed runs, interleaved ratios with their spread, repeatability.

Medians, not means, carry the comparisons: on a shared 2-core machine the time distribution has a
long right tail (other jobs, frequency changes), which moves the mean and the std but barely the median.
"""

from __future__ import annotations

import math
import statistics
from math import comb
from dataclasses import asdict, dataclass
from typing import Sequence

#: A configuration is "noisy" when a re-run could plausibly land more than this far from its median.
NOISY_RATIO = 1.10
#: Confidence of the distribution-free interval of the median round time.
CONFIDENCE = 0.95


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    """Statistics of one configuration's timed runs (milliseconds; throughput in inferences/s)."""

    runs: int
    min_ms: float
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    throughput_per_s: float  # batch / mean time: what a caller looping on the model gets

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def summarize(times_ms: Sequence[float], batch: int = 1) -> Summary:
    if not times_ms:
        raise ValueError("no timed runs to summarize")
    mean = statistics.fmean(times_ms)
    std = statistics.stdev(times_ms) if len(times_ms) > 1 else 0.0
    return Summary(len(times_ms), min(times_ms), statistics.median(times_ms), percentile(times_ms, 90),
                   percentile(times_ms, 99), mean, std, batch * 1e3 / mean if mean > 0 else math.inf)


@dataclass(frozen=True)
class Ratio:
    """``baseline / candidate`` from interleaved rounds: > 1 means the candidate is faster.

    ``median`` is the ratio of the two overall medians; ``low``/``high`` the smallest and largest
    per-round ratios (round medians), i.e. the spread a reader should expect from a re-run.
    """

    median: float
    low: float
    high: float
    rounds: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def interleaved_ratio(baseline_rounds: Sequence[Sequence[float]], candidate_rounds: Sequence[Sequence[float]]) -> Ratio:
    """Speed-up of ``candidate`` over ``baseline`` from per-round timed blocks run in alternation."""
    pairs = [(b, c) for b, c in zip(baseline_rounds, candidate_rounds) if b and c]
    if not pairs:
        raise ValueError("no interleaved rounds with runs on both sides")
    per_round = [statistics.median(b) / statistics.median(c) for b, c in pairs]
    overall = statistics.median([t for b, _ in pairs for t in b]) / statistics.median([t for _, c in pairs for t in c])
    return Ratio(overall, min(per_round), max(per_round), len(pairs))


def median_interval_ranks(n: int, confidence: float = CONFIDENCE) -> int | None:
    """The rank k (1-based) such that [x(k), x(n-k+1)] of n sorted samples covers the population median
    with probability >= ``confidence`` (the binomial order-statistic interval; no distribution assumed).
    None when n is too small for any such interval (n < 6 at 95 %)."""
    tail = (1.0 - confidence) / 2
    k = 0
    while sum(comb(n, i) for i in range(k + 1)) / 2 ** n <= tail:
        k += 1
    return k or None


@dataclass(frozen=True)
class Repeatability:
    """Will a re-run of this configuration land within 10 % of its median? Two independent signs say no:

    - drift: the medians of the first and the second half of the rounds (two back-to-back measurements
      of the same thing) differ by more than 10 %;
    - spread: the 95 % distribution-free confidence interval of the median round time (round medians,
      each round a block taken at a different moment) is wider than 10 % high/low. Rounds sample the
      machine's background load over the whole run; when their medians scatter that much, a run taken
      a minute later samples a different load and its median moves as much.
    """

    first_median_ms: float
    second_median_ms: float
    ratio: float  # larger / smaller half median, >= 1
    interval_low_ms: float | None  # the median's 95 % interval from round medians (None: too few rounds)
    interval_high_ms: float | None
    interval_ratio: float | None  # high / low
    noisy: bool

    def to_dict(self) -> dict[str, float | bool | None]:
        return asdict(self)


def repeatability(rounds: Sequence[Sequence[float]], limit: float = NOISY_RATIO) -> Repeatability | None:
    """Drift (halves) and spread (median interval over round medians); None with fewer than two rounds."""
    rounds = [r for r in rounds if r]
    if len(rounds) < 2:
        return None
    half = len(rounds) // 2
    first = statistics.median([t for r in rounds[:half] for t in r])
    second = statistics.median([t for r in rounds[half:] for t in r])
    ratio = max(first, second) / min(first, second)
    medians = sorted(statistics.median(r) for r in rounds)
    k = median_interval_ranks(len(medians))
    low = high = interval = None
    if k is not None:
        low, high = medians[k - 1], medians[len(medians) - k]
        interval = high / low
    noisy = ratio > limit or (interval is not None and interval > limit)
    return Repeatability(first, second, ratio, low, high, interval, noisy)
