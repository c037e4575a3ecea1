"""The three kinds of scalar guide (reward or value) a request can weight, behind one interface.

`branches(states, seqs, tokens, lengths)` returns r(seq + branch) for k branches per row
([n, k]; tokens [n, k, span], lengths [n, k]; a branch of length 1 is a candidate next token);
`sequences(seqs)` returns r(seq) for whole sequences ([n]). Sequences are token ids of the base
model (prompt + completion so far); rewards that read text see it decoded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch

from alignd.rewards.guide_model import GuideModel
from alignd.rewards.specs import GuideError, Route


class Reward(Protocol):
    route: Route

    def open(self) -> Any: ...

    def close(self, state: Any) -> None: ...

    def branches(
        self, states: list, seqs: list[list[int]], tokens: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor: ...

    def sequences(self, seqs: list[list[int]]) -> torch.Tensor: ...

    def active(self) -> int: ...


def extended(seqs: list[list[int]], tokens: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Every seq + branch for the k branches of each row, row-major."""
    return [
        s + branch[:n]
        for s, row, row_len in zip(seqs, tokens.tolist(), lengths.tolist())
        for branch, n in zip(row, row_len)
    ]


class CachedReward:
    """A reward model sharing the base tokenizer: candidates scored against its KV cache."""

    route = Route.cached

    def __init__(self, guide: GuideModel) -> None:
        self.guide = guide

    def open(self):
        return self.guide.open()

    def close(self, state) -> None:
        self.guide.close(state)

    def branches(self, states, seqs, tokens, lengths):
        return self.guide.score_branches(states, seqs, tokens, lengths)

    def sequences(self, seqs):
        return self.guide.score_sequences(seqs)

    def active(self) -> int:
        return len(self.guide.pool)


class StatelessReward:
    """Base for rewards that recompute from the whole sequence every time."""

    def open(self):
        return None

    def close(self, state) -> None:
        return None

    def branches(self, states, seqs, tokens, lengths):
        return self.sequences(extended(seqs, tokens, lengths)).view(lengths.shape)

    def active(self) -> int:
        return 0


class RecomputedReward(StatelessReward):
    """A reward model the cached path cannot serve: another tokenizer (the text is decoded and
    re-encoded) or another architecture. Runs the whole sequence through transformers."""

    def __init__(self, model, route: Route, tokenizer=None, base_tokenizer=None) -> None:
        self.model, self.route = model.eval(), route
        self.tokenizer, self.base_tokenizer = tokenizer, base_tokenizer
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def sequences(self, seqs):
        if self.route is Route.retokenized:
            texts = self.base_tokenizer.batch_decode(seqs, skip_special_tokens=True)
            seqs = [self.tokenizer(t)["input_ids"] for t in texts]
        # One sequence at a time: no padding conventions to get wrong on foreign models.
        out = [self.model(torch.tensor([s], device=self.device)).logits[0, 0] for s in seqs]
        return torch.stack(out).float()


class TextReward(StatelessReward):
    """A Python function over decoded texts, `f(texts) -> scores` (classifiers, rules)."""

    route = Route.text

    def __init__(self, fn: Callable[[list[str]], list[float]], base_tokenizer, device) -> None:
        self.fn, self.base_tokenizer, self.device = fn, base_tokenizer, device

    def sequences(self, seqs):
        texts = self.base_tokenizer.batch_decode(seqs, skip_special_tokens=True)
        scores = [float(x) for x in self.fn(texts)]
        if len(scores) != len(texts) or not all(math.isfinite(x) for x in scores):
            raise GuideError(f"text reward {self.fn.__name__} must return one finite float per text")
        return torch.tensor(scores, dtype=torch.float32, device=self.device)
