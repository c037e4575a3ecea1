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
from alignd.rewards.runtime import GuideRuntime, Key, Kind
from alignd.rewards.scorers import extended


@dataclass(eq=False)
class Row:
    """One request in the engine's batch, as the decoders see it."""

    params: AlignmentParams
    request_id: str
    prompt: list[int]
    output: list[int]  # the engine's live list: it grows as tokens are sampled
    guides: dict[Key, Any] = field(default_factory=dict)  # guide -> its per-request state

    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def state(self, guides: GuideRuntime, key: Key) -> Any:
        if key not in self.guides:
            self.guides[key] = guides.guide(key).open()
        return self.guides[key]

    def release(self, guides: GuideRuntime) -> None:
        for key, state in self.guides.items():
            guides.guide(key).close(state)
        self.guides.clear()


Step = Callable[[GuideRuntime, list[Row], list[list[int]], torch.Tensor], torch.Tensor]


def top_k(rows: list[Row], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The base logits' top-k (k = the largest any row asks) and a mask of each row's own k."""
    k = max(row.params.top_k for row in rows)
    z, cands = logits.topk(k, dim=-1)
    own = torch.tensor([row.params.top_k for row in rows], device=logits.device)
    return z, cands, torch.arange(k, device=logits.device)[None] < own[:, None]


def weighted(
    guides: GuideRuntime,
    kind: Kind,
    rows: list[Row],
    seqs: list[list[int]],
    tokens: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """Σ_i w_i · g_i(seq + branch) over each row's k branches ([n, k]), with the row's weights
    for guides of `kind` ("reward": alignment.rewards, "value": alignment.values). One batched
    call per guide model over all the rows that weight it."""
    total = torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)
    weights_of = (lambda row: row.params.rewards) if kind == "reward" else (lambda row: row.params.values)
    for name in sorted({name for row in rows for name in weights_of(row)}):
        scorer = guides.scorer(kind, name)
        users = [i for i, row in enumerate(rows) if name in weights_of(row)]
        for cached in (True, False):
            group = [i for i in users if rows[i].params.reward_cache == cached]
            if not group:
                continue
            idx = torch.tensor(group, device=lengths.device)
            group_seqs = [seqs[i] for i in group]
            if cached:
                states = [rows[i].state(guides, (kind, name)) for i in group]
                r = scorer.branches(states, group_seqs, tokens[idx], lengths[idx])
            else:
                r = scorer.sequences(extended(group_seqs, tokens[idx], lengths[idx])).view(len(group), -1)
            w = torch.tensor([weights_of(rows[i])[name] for i in group], device=lengths.device)
            total[idx] += w[:, None] * r.to(total.device)
    return total
