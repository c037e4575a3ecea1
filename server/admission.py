"""Admission: a request enters the engine only while what it costs fits what the server allows.

Every sequence shares the engine's steps, and a guided sequence adds its guide work to the steps
it is in. So a request is charged for what it costs, not counted as one: its samples (prompts x
n x alignment.n) against `max_concurrent_samples`, and its guide tokens per step against
`max_guide_tokens_in_flight`. (Inside the engine the scheduler spreads the guided work of the
requests let in over the steps, `guide_step_budget` a step; this bound keeps how slow that makes
them, and their guide caches, in check.) A request that could never fit is refused with 400
before it waits; one that cannot fit now waits its turn (first come, first served, so a large
request is not starved by small ones) for up to `queue_timeout`, then gets 429.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from alignd.server import metrics
from alignd.server.config import ServeSettings
from alignd.server.errors import HTTPError


@dataclass(frozen=True)
class Cost:
    samples: int  # sequences the engine runs for the request
    guide_tokens: int  # guide tokens per engine step, all its sequences together


class Admission:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.requests = 0
        self.samples = 0
        self.guide_tokens = 0
        self._waiting: deque[tuple[Cost, asyncio.Future]] = deque()
        self._closed: str | None = None

    def check(self, cost: Cost) -> None:
        """Refuse (400) a request that exceeds a per-request limit."""
        s = self.settings
        limit, flag = min((s.max_samples_per_request, "--max-samples-per-request"),
                          (s.max_concurrent_samples, "--max-concurrent-samples"))
        if cost.samples > limit:
            raise HTTPError(400, f"this request asks for {cost.samples} sequences (prompts x n x alignment.n); "
                                 f"this server allows {limit} per request ({flag})", "n")
        if cost.guide_tokens > s.max_guide_tokens_in_flight:
            raise HTTPError(400, f"this request's guided work is {cost.guide_tokens:,} guide tokens per engine step "
                                 f"(all its sequences together); this server runs at most "
                                 f"{s.max_guide_tokens_in_flight:,} at once (--max-guide-tokens-in-flight): ask for "
                                 "fewer sequences, a smaller top_k or shorter rollouts", "alignment")

    async def enter(self, cost: Cost) -> None:
        """Wait until the request may run; raise HTTPError (429, 503) if it may not."""
        s = self.settings
        if self._closed:
            raise HTTPError(503, self._closed)
        if self.requests >= s.max_concurrent_requests or self.samples + cost.samples > s.max_concurrent_samples:
            raise HTTPError(429, f"server busy: {self.requests} requests with {self.samples} sequences in flight; "
                                 "retry later", headers={"Retry-After": "1"})
        self.requests += 1
        self.samples += cost.samples
        try:
            full = self.guide_tokens + cost.guide_tokens > s.max_guide_tokens_in_flight
            if cost.guide_tokens and (self._waiting or full):
                await self._wait(cost)
            else:
                self.guide_tokens += cost.guide_tokens
        except BaseException:
            self.requests -= 1
            self.samples -= cost.samples
            raise
        self._observe()

    async def _wait(self, cost: Cost) -> None:
        turn = asyncio.get_running_loop().create_future()
        entry = (cost, turn)
        self._waiting.append(entry)
        self._observe()
        try:
            await asyncio.wait_for(asyncio.shield(turn), self.settings.queue_timeout)
        except HTTPError:  # closed: `close` already took the entry
            raise
        except BaseException as e:  # timed out, or the client went away
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self.guide_tokens -= cost.guide_tokens  # granted just as it gave up
            turn.cancel()
            if entry in self._waiting:
                self._waiting.remove(entry)
            self._wake()
            if isinstance(e, TimeoutError):
                raise HTTPError(429, "the guided work already running fills what this server runs at once "
                                     f"({self.settings.max_guide_tokens_in_flight:,} guide tokens per step) and this "
                                     f"request waited {self.settings.queue_timeout:g} s for room; retry later",
                                headers={"Retry-After": "5"}) from None
            raise
        finally:
            self._observe()

    def leave(self, cost: Cost) -> None:
        self.requests -= 1
        self.samples -= cost.samples
        self.guide_tokens -= cost.guide_tokens
        self._wake()
        self._observe()

    def _wake(self) -> None:
        while self._waiting:
            cost, turn = self._waiting[0]
            if turn.done():
                self._waiting.popleft()
                continue
            if self.guide_tokens + cost.guide_tokens > self.settings.max_guide_tokens_in_flight:
                return
            self._waiting.popleft()
            self.guide_tokens += cost.guide_tokens
            turn.set_result(None)

    def close(self, reason: str) -> None:
        """The engine is gone: refuse everything, and fail every waiting request at once."""
        self._closed = reason
        while self._waiting:
            _, turn = self._waiting.popleft()
            if not turn.done():
                turn.set_exception(HTTPError(503, reason))

    def _observe(self) -> None:
        metrics.SAMPLES_IN_FLIGHT.set(self.samples)
        metrics.GUIDE_BUDGET_IN_USE.set(self.guide_tokens)
        metrics.GUIDE_BUDGET_WAITING.set(len(self._waiting))
