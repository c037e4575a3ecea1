"""Admission: a request enters the engine only while what it costs fits what the server allows.

Every sequence shares the engine's steps, and a guided sequence adds its guide work to the steps
it is in. So a request is charged for what it costs, not counted as one: its samples (prompts x
n x alignment.n) against `max_concurrent_samples`, and its guide tokens per step against
`max_guide_tokens_in_flight`. (Inside the engine the scheduler spreads the guided work of the
requests let in over the steps, `guide_step_budget` a step; this bound keeps how slow that makes
them, and their guide caches, in check.) A request that could never fit is refused with 400
before it waits; one that cannot fit now waits its turn (first come, first served, so a large
request is not starved by small ones) for up to `queue_timeout`, then gets 429.

Admission also follows the server's life: nothing is admitted while the engine loads, while the
server drains for a shutdown, or after the engine died (503, with `Retry-After` where a retry
can succeed here or on another replica); at the shutdown deadline the requests still running are
stopped (`stopping`), each with its own error.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from enum import Enum

from alignd.server import metrics
from alignd.server.config import ServeSettings
from alignd.server.errors import HTTPError


@dataclass(frozen=True)
class Cost:
    samples: int  # sequences the engine runs for the request
    guide_tokens: int  # guide tokens per engine step, all its sequences together


class Phase(Enum):
    loading = "loading"  # the engine starts; /health and /ready answer 503
    ready = "ready"
    draining = "draining"  # after SIGTERM: requests in flight finish, new ones get 503
    dead = "dead"  # the engine died, or never started


class ShuttingDown(Exception):
    """A request still running at the shutdown deadline: it ends with a 503 of its own."""


class Admission:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.requests = 0
        self.samples = 0
        self.guide_tokens = 0
        self._waiting: deque[tuple[Cost, asyncio.Future]] = deque()
        self.phase = Phase.loading
        self._dead_reason = ""
        self.stopping = asyncio.Event()  # set at the shutdown deadline: running requests end

    def refusal(self) -> HTTPError | None:
        """Why no request is admitted now (None: they are)."""
        if self.phase is Phase.loading:
            return HTTPError(503, "the model is still loading; retry shortly", headers={"Retry-After": "5"})
        if self.phase is Phase.draining:
            # Connection: close, so that a client's next try opens a connection (to another replica).
            return HTTPError(503, "the server is shutting down; retry (another replica will answer)",
                             headers={"Retry-After": "1", "Connection": "close"})
        if self.phase is Phase.dead:
            return HTTPError(503, self._dead_reason, headers={"Retry-After": "5"})
        return None

    def ready(self) -> None:
        if self.phase is Phase.loading:
            self.phase = Phase.ready

    def drain(self) -> None:
        """SIGTERM: admit nothing more; requests waiting for room get 503 at once (they have not
        started, and another replica can serve them now)."""
        if self.phase is not Phase.dead:
            self.phase = Phase.draining
            self._fail_waiting()

    def stop(self) -> None:
        """The shutdown deadline: every request still running ends with ShuttingDown."""
        self.stopping.set()

    async def stopped(self) -> ShuttingDown:
        """Once the shutdown deadline has come: the error of a request that was still running."""
        await self.stopping.wait()
        return ShuttingDown(f"the server shut down before this request finished (requests in flight had "
                            f"{self.settings.shutdown_timeout:g} s, --shutdown-timeout); retry it")

    async def idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until no admitted request is left; whether none is."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.requests and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        return not self.requests

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
        refusal = self.refusal()
        if refusal is not None:
            raise refusal
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
        self.phase, self._dead_reason = Phase.dead, reason
        self._fail_waiting()

    def _fail_waiting(self) -> None:
        refusal = self.refusal()
        while self._waiting:
            _, turn = self._waiting.popleft()
            if not turn.done():
                turn.set_exception(HTTPError(refusal.status, refusal.message, headers=refusal.headers))

    def _observe(self) -> None:
        metrics.SAMPLES_IN_FLIGHT.set(self.samples)
        metrics.GUIDE_BUDGET_IN_USE.set(self.guide_tokens)
        metrics.GUIDE_BUDGET_WAITING.set(len(self._waiting))
