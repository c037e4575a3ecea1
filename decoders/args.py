"""ARGS: Alignment as Reward-Guided Search (Khanov et al., ICLR 2024).

    score(v) = z_v + Σ_i w_i · r_i([s, v])      for v in top-k(z), the base model's logits at s

Tokens outside the top-k are never chosen. At temperature 0 the engine takes the argmax of the
score; otherwise it samples softmax(score / T) over the k, since it divides by T after this step
(the server switches top-p/top-k off for ARGS requests).
"""

from __future__ import annotations

import torch

from alignd.decoders.base import Row, weighted_reward
from alignd.rewards.runtime import GuideRuntime


def step(guides: GuideRuntime, rows: list[Row], seqs: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
    k = max(row.params.top_k for row in rows)
    z, cands = logits.topk(k, dim=-1)
    score = z + weighted_reward(guides, rows, seqs, cands)
    own_k = torch.tensor([row.params.top_k for row in rows], device=logits.device)
    score = score.masked_fill(torch.arange(k, device=logits.device)[None] >= own_k[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(1, cands, score)
