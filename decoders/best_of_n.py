"""Best-of-n: rejection sampling by reward (Nakano et al., 2021; Gao et al., 2023).

    y* = argmax_{y_j ~ π(·|x), j = 1..n} Σ_i w_i · r_i([x, y_j])

A request-level decoder: the engine draws the n samples by the request's ordinary sampling,
then the server scores the finished samples with the worker's reward models and keeps the best
of each choice's n. A sample one of whose rewards failed has no total and cannot be picked.

With `prune` it is Speculative Rejection (Sun et al., NeurIPS 2024): at each checkpoint c (every
`every` generated tokens) the live samples Y_c of a choice are ranked by the reward of their text
so far, and only the best ⌈keep · |Y_c|⌉ go on:

    Y_{c+1} = top_{⌈keep·|Y_c|⌉} { y ∈ Y_c : Σ_i w_i · r_i([x, y_{≤c·every}]) }

The engine step below only reads: it advances each sample's reward caches by the token it just
sampled (one branch per row, batched with every other guided row) and keeps the weighted reward
at each checkpoint; the server reads those and stops the losers (server/generate.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from alignd.decoders.base import Row, weighted
from alignd.decoders.guides import Guides


def pick(totals: Sequence[float | None]) -> int | None:
    """The index of the highest total; None when no sample has one."""
    ranked = [j for j, total in enumerate(totals) if total is not None]
    return max(ranked, key=lambda j: totals[j]) if ranked else None


def observe(guides: Guides, rows: list[Row], seqs: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
    """Each row's weighted reward of its text so far, kept in Row.observed at its checkpoints;
    the logits pass unchanged."""
    made = [i for i, row in enumerate(rows) if row.output]  # a row's first step has no new token yet
    if made:
        # The newest token is the one branch of the text before it: the cache keeps its keys and
        # values, so the next step's sync costs no forward.
        last = torch.tensor([[seqs[i][-1]] for i in made], device=logits.device)
        totals = weighted(guides, "reward", [rows[i] for i in made], [seqs[i][:-1] for i in made], last[..., None],
                          torch.ones_like(last))
        for i, total in zip(made, totals[:, 0].tolist()):
            row, length = rows[i], len(rows[i].output)
            if length % row.params.prune.every == 0 and math.isfinite(total):
                row.observed[length] = total
    return logits
