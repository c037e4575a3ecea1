"""What every in-engine decoder sees: its rows, their tokens, the base logits, the guides.

A decoder is a function `step(guides, rows, seqs, logits) -> logits` over the rows of one
decoding step that use it; `logits` holds only those rows ([n, vocab], float32) and the result
replaces them before the engine's own temperature and sampling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from alignd.decoders.params import AlignmentParams
from alignd.rewards.runtime import GuideRuntime
from alignd.rewards.scorers import extended


@dataclass(eq=False)
class Row:
    """One request in the engine's batch, as the decoders see it."""

    params: AlignmentParams
    request_id: str
    prompt: list[int]
    output: list[int]  # the engine's live list: it grows as tokens are sampled
    guides: dict[str, Any] = field(default_factory=dict)  # guide name -> its per-request state

    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def state(self, guides: GuideRuntime, name: str) -> Any:
        if name not in self.guides:
            self.guides[name] = guides.reward(name).open()
        return self.guides[name]

    def release(self, guides: GuideRuntime) -> None:
        for name, state in self.guides.items():
            guides.reward(name).close(state)
        self.guides.clear()


Step = Callable[[GuideRuntime, list[Row], list[list[int]], torch.Tensor], torch.Tensor]


def weighted_reward(
    guides: GuideRuntime, rows: list[Row], seqs: list[list[int]], cands: torch.Tensor
) -> torch.Tensor:
    """Σ_i w_i · r_i(seq + [c]) for each row's candidates [n, k]: one batched call per reward
    model over all the rows that weight it."""
    total = torch.zeros(cands.shape, dtype=torch.float32, device=cands.device)
    for name in sorted({name for row in rows for name in row.params.rewards}):
        reward = guides.reward(name)
        users = [i for i, row in enumerate(rows) if name in row.params.rewards]
        for cached in (True, False):
            group = [i for i in users if rows[i].params.reward_cache == cached]
            if not group:
                continue
            idx = torch.tensor(group, device=cands.device)
            group_seqs = [seqs[i] for i in group]
            if cached:
                states = [rows[i].state(guides, name) for i in group]
                r = reward.candidates(states, group_seqs, cands[idx])
            else:
                r = reward.sequences(extended(group_seqs, cands[idx])).view(len(group), -1)
            weights = torch.tensor([rows[i].params.rewards[name] for i in group], device=cands.device)
            total[idx] += weights[:, None] * r.to(total.device)
    return total
