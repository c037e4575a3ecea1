"""The guide runtime: every configured guide model, loaded once per worker process.

vLLM may build its logits processors more than once in a worker, and best-of-n scoring reaches
the worker through `collective_rpc`; both find the same runtime here, so each model exists once.
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from alignd.rewards.guide_model import GuideModel
from alignd.rewards.scorers import CachedReward, RecomputedReward, Reward, TextReward
from alignd.rewards.specs import GuideConfig, GuideError, Route, classify, load_text_reward

log = logging.getLogger("alignd.guides")

MAX_NOTED_REQUESTS = 1024


class GuideRuntime:
    _instance: GuideRuntime | None = None

    def __init__(self, config: GuideConfig, device: torch.device, dtype: torch.dtype, max_len: int) -> None:
        self.config, self.device, self.dtype, self.max_len = config, device, dtype, max_len
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
        self.rewards: dict[str, Reward] = {
            name: self._load_reward(name, spec) for name, spec in config.rewards.items()
        }
        self.steps = 0
        self.step_seconds = 0.0
        self.notes: dict[str, list[str]] = {}

    @classmethod
    def get(cls, config: GuideConfig, device: torch.device, dtype: torch.dtype, max_len: int) -> GuideRuntime:
        if cls._instance is None or cls._instance.config != config:
            cls._instance = cls(config, device, dtype, max_len)
        return cls._instance

    @classmethod
    def current(cls) -> GuideRuntime:
        if cls._instance is None:
            raise RuntimeError("the alignd guide runtime is not running in this process")
        return cls._instance

    def _load_reward(self, name: str, spec: str) -> Reward:
        route = classify(spec, self.tokenizer)
        if route is Route.text:
            return TextReward(load_text_reward(spec), self.tokenizer, self.device)
        model = AutoModelForSequenceClassification.from_pretrained(spec, dtype=self.dtype)
        model = model.to(self.device)
        if route is Route.cached:
            log.info("reward %s: %s, KV-cached path", name, spec)
            return CachedReward(GuideModel(model, "score", self.max_len + 1))
        log.warning(
            "reward %s: %s runs on the slow %s path (every candidate recomputed from the whole text)",
            name, spec, route.value,
        )
        tok = AutoTokenizer.from_pretrained(spec) if route is Route.retokenized else None
        return RecomputedReward(model, route, tok, self.tokenizer)

    def reward(self, name: str) -> Reward:
        try:
            return self.rewards[name]
        except KeyError:
            raise GuideError(f"unknown reward {name!r}; configured: {sorted(self.rewards)}") from None

    def score(self, seqs: list[list[int]], names: list[str]) -> list[dict[str, float]]:
        """Rewards of whole sequences (best-of-n ranking, the rewards reported with a response)."""
        out: list[dict[str, float]] = [{} for _ in seqs]
        for name in names:
            for row, value in zip(out, self.reward(name).sequences(seqs).tolist()):
                row[name] = value
        return out

    def note(self, request_id: str, message: str) -> None:
        """Remember a problem of one request, for its response; bounded for requests never collected."""
        if len(self.notes) >= MAX_NOTED_REQUESTS:
            self.notes.pop(next(iter(self.notes)))
        self.notes.setdefault(request_id, []).append(message)

    def take_notes(self, request_id: str) -> list[str]:
        return self.notes.pop(request_id, [])

    def record_step(self, started: float) -> None:
        self.steps += 1
        self.step_seconds += time.perf_counter() - started

    def stats(self) -> dict[str, float]:
        return {
            "guide_states": sum(r.active() for r in self.rewards.values()),
            "guided_steps": self.steps,
            "guided_step_seconds": self.step_seconds,
        }
