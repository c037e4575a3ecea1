"""What a decoder may ask of the guide models: the contract between decoders/ and rewards/.

Two families, kept apart:

- Scorers, by kind: "reward" models r(x, y) (a request's `alignment.rewards`) and "value" models
  V(s) (`alignment.values`). A scorer returns one number per sequence. Whether it reads a KV
  cache, recomputes every sequence, or calls a Python function over texts is its own business.
- Language models, by role: the "reference" (DeRa's SFT model) and the "baseline" (Transfer Q*'s
  rollout policy). They return next-token logits and greedy continuations.

A guide keeps per-request state (a KV-cache slot, or nothing for a stateless scorer): a row
opens it on first use and closes it when the request ends (decoders.base.Row).
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch

from alignd.rewards.kv_pool import Slot

ScorerKind = Literal["reward", "value"]
Role = Literal["reference", "baseline"]
GuideKey = tuple[str, str]  # (kind, name) of a scorer, (role, "") of a language model
GuideState = Slot | None  # None: a guide that keeps nothing per request


class Scorer(Protocol):
    def open(self) -> GuideState: ...

    def close(self, state: GuideState) -> None: ...

    def branches(
        self, states: list[GuideState], seqs: list[list[int]], tokens: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """r(seq + branch) for k branches per row: [n, k]. tokens [n, k, span] holds each
        branch (its first token is a candidate next token), lengths [n, k] how many are real.
        Raises RowFailures (rewards.scorers) when it knows which rows failed."""
        ...

    def sequences(self, seqs: list[list[int]]) -> torch.Tensor:
        """r(seq) of whole sequences: [n]."""
        ...


class LanguageModel(Protocol):
    def open(self) -> Slot: ...

    def close(self, state: Slot) -> None: ...

    def last_outputs(self, states: list[Slot], seqs: list[list[int]]) -> torch.Tensor:
        """Next-token logits after each sequence: [n, vocab]."""
        ...

    def rollout(
        self, states: list[Slot], seqs: list[list[int]], cands: torch.Tensor, steps: int, eos: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy continuations of seq + [c] for each row's k candidates: tokens [n, k, steps]
        and lengths [n, k] (a continuation ends with its first eos)."""
        ...


class Guides(Protocol):
    """Every guide a server loaded, by kind and name or by role."""

    @property
    def eos(self) -> int | None: ...

    def scorer(self, kind: ScorerKind, name: str, cached: bool = True) -> Scorer:
        """The scorer; `cached=False` gives one that re-reads every sequence whole (the
        papers' reference cost, for benchmarks) with the same model."""
        ...

    def lm(self, role: Role) -> LanguageModel: ...
