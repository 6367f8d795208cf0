"""Bootstrap confidence intervals over problems (scipy's ``stats.bootstrap``), for the evaluation's
accuracies and comparisons (``tasks.metrics``) and RL's probe gain (``tasks.rl.probe_gain``).

A module of its own so that the stages using it are keyed on this code alone: an edit of an
evaluation metric must not recompute RL.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
N_RESAMPLES = 9999


def bootstrap_interval(
    values: Sequence[float],
    *,
    reference: Sequence[float] | None = None,
    ratio: bool = False,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of mean(values), resampling its entries (one per problem).

    With ``reference`` (one value per problem, the same problems in the same order) the two are
    resampled in pairs and the statistic is mean(values) − mean(reference), or with ``ratio``
    mean(values) / mean(reference). None with fewer than two problems (nothing to resample), and None
    when a bound is not finite (a ratio whose resampled reference costs 0 tokens).
    Percentile rather than BCa: BCa is undefined when every problem scores the same (a system
    that solves all of them), where the percentile interval is that one value.
    """
    x = np.asarray(values, dtype=float)
    if reference is not None and len(reference) != len(x):
        raise ValueError(f"bootstrap_interval: {len(x)} values but {len(reference)} reference values")
    if x.size < 2:
        return None
    rng = np.random.default_rng(seed)
    if reference is None:
        ci = stats.bootstrap((x,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                             method="percentile", vectorized=True, rng=rng).confidence_interval  # fmt: skip
    else:
        y = np.asarray(reference, dtype=float)

        def statistic(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
            return a.mean(axis=axis) / b.mean(axis=axis) if ratio else a.mean(axis=axis) - b.mean(axis=axis)

        # a resample whose reference costs 0 tokens: inf or NaN, answered with None below, not with numpy's or
        # scipy's warnings (scipy's speaks of BCa, which is not used here)
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
            ci = stats.bootstrap((x, y), statistic, paired=True, n_resamples=n_resamples, confidence_level=confidence,
                                 method="percentile", vectorized=True, rng=rng).confidence_interval  # fmt: skip
    low, high = float(ci.low), float(ci.high)
    return (low, high) if math.isfinite(low) and math.isfinite(high) else None
