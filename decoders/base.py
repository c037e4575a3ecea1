"""What every in-engine decoder sees: its rows, their tokens, the base logits, the guides.

A decoder is a function `step(guides, rows, seqs, logits) -> logits` over the rows of one
decoding step that use it; `logits` holds only those rows ([n, vocab], float32) and the result
replaces them before the engine's own temperature and sampling. `guides` is the contract of
decoders/guides.py, so a decoder runs the same on the engine's guide runtime and in a unit test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from alignd.decoders.guides import GuideKey, Guides, GuideState, LanguageModel, Role, Scorer, ScorerKind
from alignd.rewards.scorers import RowFailures

if TYPE_CHECKING:
    from alignd.decoders.params import AlignmentParams


class GuideFailure(Exception):
    """A guide call failed, and which of its rows caused it is not known."""

    def __init__(self, guide: str, reason: str) -> None:
        super().__init__(f"{guide}: {reason}")
        self.guide, self.reason = guide, reason


@contextmanager
def guide_call(guide: str) -> Iterator[None]:
    """Name the guide in whatever a call into it raises."""
    try:
        yield
    except GuideFailure:
        raise
    except Exception as e:
        raise GuideFailure(guide, f"{type(e).__name__}: {e}") from e


@dataclass(eq=False)
class Row:
    """One request in the engine's batch, as the decoders see it."""

    params: AlignmentParams
    request_id: str
    prompt: list[int]
    output: list[int]  # the engine's live list: it grows as tokens are sampled
    sampling: Any = None  # the request's vllm SamplingParams: the engine keeps it while the request lives
    # Each guide this row opened, with its per-request state (closed by `release`).
    guides: dict[GuideKey, tuple[Scorer | LanguageModel, GuideState]] = field(default_factory=dict)
    # (guide, reason) once a guide failed for this row: it is decoded unguided from then on.
    failure: tuple[str, str] | None = None
    # (guide, reason) when a guide could not score this row in the current step only.
    skipped: tuple[str, str] | None = None
    sample: str = ""  # best_of_n with prune: the sample's name, under which `observed` is read
    observed: dict[int, float] = field(default_factory=dict)  # generated tokens -> weighted reward then

    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def state(self, key: GuideKey, guide: Scorer | LanguageModel) -> GuideState:
        if key not in self.guides:
            self.guides[key] = (guide, guide.open())
        return self.guides[key][1]

    def release(self) -> None:
        for guide, state in self.guides.values():
            guide.close(state)
        self.guides.clear()


Step = Callable[[Guides, list[Row], list[list[int]], torch.Tensor], torch.Tensor]


def lm_states(guides: Guides, role: Role, rows: list[Row]) -> tuple[LanguageModel, list]:
    """The language model of `role` and each row's state in it."""
    lm = guides.lm(role)
    return lm, [row.state((role, ""), lm) for row in rows]


def logit_bias(rows: list[Row], like: torch.Tensor) -> torch.Tensor | None:
    """Each row's OpenAI `logit_bias` as a dense [n, vocab] tensor, or None when no row has one.
    (The engine has already added it to the base logits a decoder receives.)"""
    biased = [(i, row.sampling.logit_bias) for i, row in enumerate(rows)
              if row.sampling is not None and row.sampling.logit_bias]
    if not biased:
        return None
    dense = torch.zeros_like(like)
    for i, bias in biased:
        tokens = torch.tensor(list(bias), device=like.device)
        dense[i, tokens] = torch.tensor(list(bias.values()), dtype=like.dtype, device=like.device)
    return dense


def top_k(rows: list[Row], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The base logits' top-k (k = the largest any row asks) and a mask of each row's own k."""
    k = max(row.params.top_k for row in rows)
    z, cands = logits.topk(k, dim=-1)
    own = torch.tensor([row.params.top_k for row in rows], device=logits.device)
    return z, cands, torch.arange(k, device=logits.device)[None] < own[:, None]


def weighted(
    guides: Guides,
    kind: ScorerKind,
    rows: list[Row],
    seqs: list[list[int]],
    tokens: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """Σ_i w_i · g_i(seq + branch) over each row's k branches ([n, k]), with the row's weights
    for guides of `kind` ("reward": alignment.rewards, "value": alignment.values). One batched
    call per guide model over all the rows that weight it. A row its guide failed on is marked
    (Row.failure, Row.skipped) and gets NaN."""
    total = torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)
    weights_of = (lambda row: row.params.rewards) if kind == "reward" else (lambda row: row.params.values)
    for name in sorted({name for row in rows for name in weights_of(row)}):
        users = [i for i, row in enumerate(rows) if name in weights_of(row)]
        for cached in (True, False):
            group = [i for i in users if rows[i].params.reward_cache == cached]
            if not group:
                continue
            idx = torch.tensor(group, device=lengths.device)
            guide = f"{kind} {name!r}"
            with guide_call(guide):
                scorer = guides.scorer(kind, name, cached)
                states = [rows[i].state((kind, name), scorer) for i in group]
                try:
                    r = scorer.branches(states, [seqs[i] for i in group], tokens[idx], lengths[idx])
                except RowFailures as e:
                    r = e.scores
                    for i, reason in e.reasons.items():
                        row = rows[group[i]]
                        if i in e.transient:
                            row.skipped = row.skipped or (guide, reason)
                        else:
                            row.failure = row.failure or (guide, reason)
            w = torch.tensor([weights_of(rows[i])[name] for i in group], device=lengths.device)
            total[idx] += w[:, None] * r.to(total.device)
    return total
