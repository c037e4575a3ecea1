"""ARGS: Alignment as Reward-Guided Search (Khanov et al., ICLR 2024).

    score(v) = z_v + Σ_i w_i · r_i([s, v])      for v in top-k(z), the base model's logits at s

Tokens outside the top-k are never chosen. At temperature 0 the engine takes the argmax of the
score; otherwise it samples softmax(score / T) over the k, since it divides by T after this step
(the server switches top-p off for ARGS requests).
"""

from __future__ import annotations

import torch

from alignd.decoders.base import Row, top_k, weighted
from alignd.decoders.guides import Guides


def step(guides: Guides, rows: list[Row], seqs: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
    z, cands, own = top_k(rows, logits)
    score = z + weighted(guides, "reward", rows, seqs, cands[..., None], torch.ones_like(cands))
    score = score.masked_fill(~own, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(1, cands, score)
