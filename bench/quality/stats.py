"""Paired bootstrap over prompts."""

from __future__ import annotations

import numpy as np

RESAMPLES = 10_000


def paired_diff(a: list[float], b: list[float], seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """Mean of a - b over prompts (pairs with a NaN dropped), and its 95 % percentile bootstrap
    interval (prompts resampled with replacement; one seeded generator per call)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    d = x[ok] - y[ok]
    if len(d) == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(resamples, len(d)))
    means = d[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": int(len(d))}


def ratio_ci(a: list[float], b: list[float], seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """mean(a) / mean(b) - 1 (a relative gain, as the ARGS paper reports it), paired bootstrap."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) == 0 or y.mean() == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": int(len(x))}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(resamples, len(x)))
    r = x[idx].mean(axis=1) / y[idx].mean(axis=1) - 1
    lo, hi = np.percentile(r, [2.5, 97.5])
    return {"mean": float(x.mean() / y.mean() - 1), "lo": float(lo), "hi": float(hi), "n": int(len(x))}
