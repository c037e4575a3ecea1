"""Correlations for the model cards and held-out checks (scipy's; NaN where one side is constant)."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


def pearson(x, y) -> float:
    x, y = _pair(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.pearsonr(x, y).statistic)


def spearman(x, y) -> float:
    x, y = _pair(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(x, y).statistic)
