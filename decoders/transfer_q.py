"""Transfer Q* (Chakraborty et al., 2024).

    Q(s, v) = Σ_i w_i · r_i([s, v, rollout_baseline(s, v)])      for v in top-k(z)
    score(v) = z_v + Q(s, v)

The baseline (an already aligned model) continues each candidate greedily for `rollout_tokens`
(stopping at end-of-sequence); the target rewards score the whole continuation. Greedy at
temperature 0, otherwise softmax(score / T) over the k, as in ARGS. All candidates of all rows
roll out in one batched generation forked from the baseline's cached prefix, and the rewards
score all rollouts in one tree-masked forward over their own cached prefixes.
"""

from __future__ import annotations

import torch

from alignd.decoders.base import Row, guide_call, lm_states, top_k, weighted
from alignd.decoders.guides import Guides


def step(guides: Guides, rows: list[Row], seqs: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
    z, cands, own = top_k(rows, logits)
    steps = max(row.params.rollout_tokens for row in rows)
    with guide_call("baseline"):
        baseline, states = lm_states(guides, "baseline", rows)
        rollout, length = baseline.rollout(states, seqs, cands, steps, guides.eos)
    own_steps = torch.tensor([row.params.rollout_tokens for row in rows], device=length.device)
    length = torch.minimum(length.to(logits.device), own_steps[:, None].to(logits.device))
    branches = torch.cat([cands[..., None], rollout.to(logits.device)], dim=-1)
    q = weighted(guides, "reward", rows, seqs, branches, 1 + length)
    score = (z + q).masked_fill(~own, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(1, cands, score)
