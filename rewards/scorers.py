"""The three kinds of scalar guide (reward or value) a request can weight, behind the one
`Scorer` interface of decoders/guides.py: KV-cached, recomputed from the whole text, or a Python
function over texts. Sequences are token ids of the base model (prompt + completion so far);
rewards that read text see it decoded.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from alignd.decoders.guides import GuideState, Scorer
from alignd.rewards.guide_model import GuideModel
from alignd.rewards.specs import Route
from alignd.rewards.text_process import TextRewardProcess


class Reward(Scorer, Protocol):
    """A scorer as the runtime holds it: how it runs, and how many request states it holds."""

    route: Route

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

    def open(self) -> GuideState:
        return None

    def close(self, state: GuideState) -> None:
        return None

    def branches(self, states, seqs, tokens, lengths):
        return self.sequences(extended(seqs, tokens, lengths)).view(lengths.shape)

    def active(self) -> int:
        return 0


class Recomputing(StatelessReward):
    """A KV-cached reward made to re-read every candidate's whole text, as the papers' reference
    code does (a request's alignment.reward_cache=false, for benchmarks)."""

    def __init__(self, cached: CachedReward) -> None:
        self.cached, self.route = cached, cached.route

    def sequences(self, seqs):
        return self.cached.sequences(seqs)


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


class RowFailures(Exception):
    """Some rows of a scorer call failed: `scores` holds every row's result (NaN where it
    failed), `reasons` why each failed row did, and `transient` the rows that failed only
    because the guide could not take calls at that moment (a text reward restarting)."""

    def __init__(self, scores: torch.Tensor, reasons: dict[int, str], transient: set[int]) -> None:
        super().__init__(f"{len(reasons)} rows failed")
        self.scores, self.reasons, self.transient = scores, reasons, transient


# float32 holds |x| < 3.4e38; a text reward's score must stay far from that so that weights up
# to MAX_WEIGHT keep the combined scores finite.
MAX_TEXT_SCORE = 1e12


class TextReward(StatelessReward):
    """A Python function over decoded texts, `f(texts) -> scores` (classifiers, rules), run in a
    child process with a time limit per row (text_process)."""

    route = Route.text

    def __init__(self, process: TextRewardProcess, base_tokenizer, device) -> None:
        self.process, self.base_tokenizer, self.device = process, base_tokenizer, device

    def _rows(self, rows: list[list[list[int]]]) -> torch.Tensor:
        """Scores [len(rows), k] of rows of k token sequences each; raises RowFailures."""
        texts = [self.base_tokenizer.batch_decode(seqs, skip_special_tokens=True) for seqs in rows]
        width = max(len(t) for t in texts)
        scores = torch.full((len(rows), width), float("nan"))
        reasons: dict[int, str] = {}
        transient: set[int] = set()
        for i, (row, result) in enumerate(zip(texts, self.process(texts))):
            if isinstance(result, str):
                reasons[i] = result
                if result.startswith("not available"):
                    transient.add(i)
            elif len(result) != len(row):
                reasons[i] = f"returned {len(result)} scores for {len(row)} texts"
            elif not all(math.isfinite(x) and abs(x) <= MAX_TEXT_SCORE for x in result):
                reasons[i] = f"returned a score that is not finite or beyond ±{MAX_TEXT_SCORE:g}"
            else:
                scores[i, : len(result)] = torch.tensor(result)
        scores = scores.to(self.device)
        if reasons:
            raise RowFailures(scores, reasons, transient)
        return scores

    def branches(self, states, seqs, tokens, lengths):
        k = lengths.shape[1]
        flat = extended(seqs, tokens, lengths)
        return self._rows([flat[i * k : (i + 1) * k] for i in range(len(seqs))])

    def sequences(self, seqs):
        return self._rows([[s] for s in seqs])[:, 0]
