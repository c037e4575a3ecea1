"""Best-of-n: rejection sampling by reward (Nakano et al., 2021; Gao et al., 2023).

    y* = argmax_{y_j ~ π(·|x), j = 1..n} Σ_i w_i · r_i([x, y_j])

A request-level decoder: the engine draws the n samples by the request's ordinary sampling,
then the server scores the finished samples with the worker's reward models and keeps the best
of each choice's n. A sample one of whose rewards failed has no total and cannot be picked.
"""

from __future__ import annotations

from collections.abc import Sequence


def pick(totals: Sequence[float | None]) -> int | None:
    """The index of the highest total; None when no sample has one."""
    ranked = [j for j, total in enumerate(totals) if total is not None]
    return max(ranked, key=lambda j: totals[j]) if ranked else None
