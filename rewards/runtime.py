"""The guide runtime: every configured guide model, loaded once per worker process.

vLLM may build its logits processors more than once in a worker, and best-of-n scoring reaches
the worker through `collective_rpc`; both find the same runtime here, so each model exists once.

It is what decoders/guides.py calls `Guides`: scorers by kind ("reward", "value") and name,
language models by role ("reference", "baseline"), each with its own per-request KV caches.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignd.decoders.guides import Role, ScorerKind
from alignd.rewards.guide_model import GuideModel
from alignd.rewards.scorers import CachedReward, RecomputedReward, Recomputing, Reward, RowFailures, TextReward
from alignd.rewards.specs import GuideConfig, GuideError, Route, classify
from alignd.rewards.text_process import TextRewardProcess

log = logging.getLogger("alignd.guides")

MAX_NOTED_REQUESTS = 1024

class GuideRuntime:
    _instance: GuideRuntime | None = None

    def __init__(self, config: GuideConfig, device: torch.device, dtype: torch.dtype, max_len: int) -> None:
        self.config, self.device, self.dtype, self.max_len = config, device, dtype, max_len
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.scorers: dict[str, dict[str, Reward]] = {
            "reward": {n: self._load_scorer("reward", n, s) for n, s in config.rewards.items()},
            "value": {n: self._load_scorer("value", n, s) for n, s in config.values.items()},
        }
        self.recomputing = {
            (kind, name): Recomputing(scorer) if isinstance(scorer, CachedReward) else scorer
            for kind, group in self.scorers.items() for name, scorer in group.items()
        }
        self.lms: dict[str, GuideModel] = {}
        if config.reference:
            self.lms["reference"] = self._load_lm("reference", config.reference)
        if config.baseline:
            self.lms["baseline"] = self._load_lm("baseline", config.baseline)
        self.steps = 0
        self.step_seconds = 0.0
        self.max_step_seconds = 0.0
        self.guide_tokens = 0
        self.max_step_guide_tokens = 0
        self.failures: dict[str, int] = {}  # guide -> rows it failed
        self.notes: dict[str, dict[str, int]] = {}  # request -> note -> how often
        # best_of_n with prune: request -> sample -> checkpoint -> the weighted reward there
        # (the processor's rows fill them); kept, like the notes, until the response is made.
        self.checkpoints: dict[str, dict[str, dict[int, float]]] = {}
        # Blockwise searches: key -> reward name -> (scorer, the search's cached prefix state).
        self.searches: dict[str, dict[str, tuple[Reward, object]]] = {}
        self.runner = None  # the worker's model runner, once the server attached it (worker.py)
        # Release the state of requests that ended; each returns how many rows it still holds
        # out of the batch.
        self.sweepers: list[Callable[[], int]] = []

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

    # -- loading --------------------------------------------------------------------------------
    def _load_scorer(self, kind: ScorerKind, name: str, spec: str) -> Reward:
        route = classify(spec, self.tokenizer, kind)
        if route is Route.text:
            return TextReward(TextRewardProcess(spec, self.config.text_reward_timeout), self.tokenizer, self.device)
        model = AutoModelForSequenceClassification.from_pretrained(spec, dtype=self.dtype).to(self.device)
        if route is Route.cached:
            log.info("%s %s: %s, KV-cached path", kind, name, spec)
            return CachedReward(GuideModel(model, "score", self.max_len + 1))
        log.warning(
            "%s %s: %s runs on the slow %s path (every candidate recomputed from the whole text)",
            kind, name, spec, route.value,
        )
        tok = AutoTokenizer.from_pretrained(spec) if route is Route.retokenized else None
        return RecomputedReward(model, route, tok, self.tokenizer)

    def _load_lm(self, role: Role, spec: str) -> GuideModel:
        # One copy per model: a reference that is also the baseline is loaded once.
        for other in self.lms.values():
            if other.spec == spec:
                return other
        log.info("%s: %s, KV-cached path", role, spec)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=self.dtype).to(self.device)
        return GuideModel(model, "lm", self.max_len + 1)

    # -- lookup ---------------------------------------------------------------------------------
    def scorer(self, kind: ScorerKind, name: str, cached: bool = True) -> Reward:
        try:
            return self.scorers[kind][name] if cached else self.recomputing[kind, name]
        except KeyError:
            raise GuideError(f"unknown {kind} {name!r}; configured: {sorted(self.scorers[kind])}") from None

    def lm(self, role: Role) -> GuideModel:
        if role not in self.lms:
            if role == "baseline":  # defaults to the served model, loaded on first use
                log.warning("baseline: loading the served model %s as the Transfer Q* baseline", self.config.model)
                self.lms[role] = self._load_lm(role, self.config.model)
            else:
                raise GuideError("no reference model: start the server with --reference")
        return self.lms[role]

    @property
    def eos(self) -> int | None:
        return self.tokenizer.eos_token_id

    # -- whole sequences (front end, via collective_rpc) ---------------------------------------
    def score(self, seqs: list[list[int]], names: list[str],
              kind: ScorerKind = "reward") -> tuple[list[dict[str, float]], list[dict[str, str]]]:
        """Scores of whole sequences by the scorers of `kind` named (best-of-n ranking, the rewards
        reported with a response, /v1/rewards): per sequence, the scores it got and why each other
        one failed. A failure stays with the sequence that caused it: a batch that raises is
        scored again one sequence at a time."""
        rewards: list[dict[str, float]] = [{} for _ in seqs]
        failed: list[dict[str, str]] = [{} for _ in seqs]
        for name in names:
            for got, why, value in zip(rewards, failed, self._each(self.scorer(kind, name), seqs)):
                if isinstance(value, str):
                    why[name] = value
                    self.failed(f"{kind}:{name}")
                else:
                    got[name] = value
        return rewards, failed

    def score_blocks(self, key: str, seq: list[int], blocks: list[list[int]],
                     names: list[str]) -> tuple[list[dict[str, float]], list[dict[str, str]]]:
        """Rewards of seq + block for each block, as score() gives them: the blocks are branches
        of one tree-masked forward per reward against the search's cached prefix `seq`, which
        grows by the accepted block from one call to the next (end_search frees it)."""
        rewards: list[dict[str, float]] = [{} for _ in blocks]
        failed: list[dict[str, str]] = [{} for _ in blocks]
        width = max(len(b) for b in blocks)
        tokens = torch.tensor([[b + [0] * (width - len(b)) for b in blocks]], device=self.device)
        lengths = torch.tensor([[len(b) for b in blocks]], device=self.device)
        opened = self.searches.setdefault(key, {})
        for name in names:
            scorer = self.scorer("reward", name)
            if name not in opened:
                opened[name] = (scorer, scorer.open())
            try:
                values: list[float | str] = scorer.branches([opened[name][1]], [seq], tokens, lengths)[0].tolist()
            except Exception:  # noqa: BLE001 - scored again one text at a time, each failure its own
                values = self._each(scorer, [seq + b for b in blocks])
            for got, why, value in zip(rewards, failed, values):
                if isinstance(value, str) or not math.isfinite(value):
                    why[name] = value if isinstance(value, str) else "returned a non-finite score"
                    self.failed(f"reward:{name}")
                else:
                    got[name] = value
        return rewards, failed

    def end_search(self, key: str) -> None:
        for scorer, state in self.searches.pop(key, {}).values():
            scorer.close(state)

    def _each(self, scorer: Reward, seqs: list[list[int]]) -> list[float | str]:
        """Each sequence's score, or why it has none."""
        try:
            values = scorer.sequences(seqs).tolist()
        except RowFailures as e:
            return [e.reasons.get(i, v) for i, v in enumerate(e.scores.tolist())]
        except Exception as e:  # noqa: BLE001 - reported with the response; the server goes on
            if len(seqs) == 1:
                log.exception("alignd: a reward failed on one sequence")
                return [f"{type(e).__name__}: {e}"]
            return [v for seq in seqs for v in self._each(scorer, [seq])]
        return [v if math.isfinite(v) else "returned a non-finite score" for v in values]

    # -- bookkeeping ----------------------------------------------------------------------------
    def note(self, request_id: str, message: str) -> None:
        """Remember a problem of one request for its response, counted rather than repeated;
        bounded for requests never collected."""
        counts = _bounded_put(self.notes, request_id, {}, MAX_NOTED_REQUESTS)
        counts[message] = counts.get(message, 0) + 1

    def observe(self, request_id: str, sample: str, observed: dict[int, float]) -> None:
        """Keep a pruning sample's checkpoint rewards (filled as it decodes) for its response."""
        _bounded_put(self.checkpoints, request_id, {}, MAX_NOTED_REQUESTS)[sample] = observed

    def checkpoint_totals(self, request_id: str, samples: list[str], at: int) -> list[float | None]:
        mine = self.checkpoints.get(request_id, {})
        return [mine.get(sample, {}).get(at) for sample in samples]

    def take_notes(self, request_id: str) -> list[str]:
        self.checkpoints.pop(request_id, None)  # the response is being made: nothing reads them later
        return [m if n == 1 else f"{m} (x{n})" for m, n in self.notes.pop(request_id, {}).items()]

    def failed(self, guide: str, rows: int = 1) -> None:
        self.failures[guide] = self.failures.get(guide, 0) + rows

    def record_step(self, started: float, guide_tokens: int) -> None:
        seconds = time.perf_counter() - started
        self.steps += 1
        self.step_seconds += seconds
        self.max_step_seconds = max(self.max_step_seconds, seconds)
        self.guide_tokens += guide_tokens
        self.max_step_guide_tokens = max(self.max_step_guide_tokens, guide_tokens)

    def stats(self) -> dict:
        waiting = sum(sweep() for sweep in self.sweepers)  # an idle engine runs no step that would sweep
        scorers = [r for group in self.scorers.values() for r in group.values()]
        return {
            "guide_states": sum(r.active() for r in scorers)
            + sum(len(m.pool) for m in {id(m): m for m in self.lms.values()}.values()),
            "guided_steps": self.steps,
            "guided_step_seconds": self.step_seconds,
            "max_guided_step_seconds": self.max_step_seconds,
            "guide_tokens": self.guide_tokens,
            "max_step_guide_tokens": self.max_step_guide_tokens,
            "guide_failures": dict(self.failures),
            "guided_rows_waiting": waiting,
        }


def _bounded_put(table: dict, key: str, empty: dict, limit: int) -> dict:
    """table[key], made `empty` if new; the oldest entry goes when `limit` would be passed."""
    if key not in table and len(table) >= limit:
        table.pop(next(iter(table)))
    return table.setdefault(key, empty)
