"""vLLM's scheduler with a budget for the guided work of each engine step.

A guided sequence adds its guide work to every step it is in, and every request in that step
waits for it. vLLM's scheduler puts every running sequence into every step; this one lets guided
sequences into a step by a token bucket: each step adds `guide_step_budget` guide tokens of
credit (kept up to the larger of one step's budget and the costliest sequence that waits), and
the guided sequences take turns, the one that waited longest first, while the credit covers
their cost (decoders/cost.py). The others skip the step through vLLM's own
`next_decode_eligible_step` and keep their caches. A new guided request takes its turn like the
others: its first step (its cost plus the guides' fill of its prompt) stays in vLLM's waiting
queue until the credit covers it, so many guided requests arriving at once start over several
steps instead of making one long step. Plain sequences are never held.

So the guided work averages at most the budget per step, however many guided requests run: a
plain request's steps stay short, and the guided requests share what the budget allows. A
sequence that alone costs more than the budget runs once enough credit has accumulated, in a
step of its own.

A guide token's cost in time differs by hardware and guide (a rollout token, a text reward's
call, a batched branch token), so the scheduler also times its steps (`StepTimes`): while plain
sequences run, the credit a step adds is held to `guide_time_share` of what a step without
guided rows takes, in guide tokens at the measured rate. With only guided sequences in the step
nobody waits for another's guides, and the token budget alone applies. Where the guides leave
no step without them, a probe step now and then holds every guided row out, for comparison.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from itertools import chain

import numpy as np
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from alignd.decoders.cost import guide_tokens
from alignd.decoders.params import AlignmentParams, from_extra_args
from alignd.rewards.specs import GuideConfig

log = logging.getLogger("alignd.scheduler")

# Steps with plain rows between steps that hold every guided row out, for the timing to compare
# against: few while it cannot tell yet what guides cost, rare once it can.
PROBE_EVERY, REFRESH_EVERY = 16, 256


class StepTimes:
    """What recent steps with plain rows took: without guided rows (an average, `plain`), and
    per guide token more with them (recent guided steps' seconds beyond `plain`, over their
    guide tokens; older steps weigh less, by 1 - 1/memory a step). A guide token's time is an
    average over whatever guides ran: the cost model's tokens are not equally slow (a text
    reward's call, a rollout token, a batched branch token), so it is measured, not assumed."""

    def __init__(self, memory: int = 64, min_guided_steps: int = 4) -> None:
        self.decay = 1.0 - 1.0 / memory
        self.min_guided_steps = min_guided_steps
        self.plain: float | None = None
        self.plain_steps = 0
        self.since_plain = 0  # guided steps since the last one without
        self.guided = np.zeros(3)  # decayed sums over guided steps: steps, seconds, guide tokens

    def add(self, guide_tokens: float, seconds: float) -> None:
        if guide_tokens > 0:
            self.guided = self.decay * self.guided + np.array([1.0, seconds, guide_tokens])
            self.since_plain += 1
            return
        self.plain_steps += 1
        weight = max(1.0 / self.plain_steps, 1.0 - self.decay)
        self.plain = seconds if self.plain is None else (1 - weight) * self.plain + weight * seconds
        self.since_plain = 0

    def fit(self) -> tuple[float, float] | None:
        """(seconds of a step without guided rows, seconds per guide token), or None until both
        kinds of step were seen."""
        steps, seconds, tokens = self.guided
        if self.plain is None or steps < self.min_guided_steps:
            return None
        per_token = (seconds - self.plain * steps) / tokens
        return (self.plain, per_token) if per_token > 0 else None


class GuideBudget:
    """Mixed into vLLM's Scheduler (or AsyncScheduler): holds guided sequences beyond the budget."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = (self.vllm_config.additional_config or {}).get("alignd") or {}
        guides = GuideConfig.model_validate(config) if config else None
        self.guide_budget = float(guides.guide_step_budget) if guides else 0.0
        self.time_share = guides.guide_time_share if guides else 0.0
        self.routes = guides.route_map() if guides else {}
        self.step_times = StepTimes()
        self.in_flight: deque[tuple[float, bool, float]] = deque()  # steps scheduled: when, with plain rows, guide tokens
        self.let_in: set[str] = set()  # guided requests in the step being scheduled
        self.last_output = 0.0
        self.logged_at = 0.0
        self.guide_credit = 0.0
        self.guided_turn: dict[str, int] = {}  # request id -> the last step it was guided in (or arrived)
        self.alignments: dict[str, AlignmentParams | None] = {}  # request id -> what it asks
        self.starting: dict[str, tuple[float, int]] = {}  # new requests paid for this step: cost, turn before

    def _guide_cost(self, request: Request) -> int:
        if request.request_id not in self.alignments:
            guided = from_extra_args(request.sampling_params.extra_args) if request.sampling_params else None
            self.alignments[request.request_id] = guided.alignment if guided is not None else None
        al = self.alignments[request.request_id]
        return 0 if al is None else guide_tokens(al, self.routes, request.num_tokens)

    def _first_step_cost(self, request: Request) -> int:
        cost = self._guide_cost(request)
        return cost + request.num_prompt_tokens if cost > 0 else 0

    def schedule(self, *args, **kwargs) -> SchedulerOutput:
        if self.guide_budget <= 0:
            return super().schedule(*args, **kwargs)
        spent = self._take_turns(self.current_step + 1)  # schedule() counts this step first
        out = super().schedule(*args, **kwargs)
        # A new request paid for but not started (no KV room, token budget spent) gets its
        # credit back and keeps its place in the turn order.
        started = {new.req_id for new in out.scheduled_new_reqs}
        for request_id, (cost, turn) in self.starting.items():
            if request_id not in started:
                self.guide_credit += cost
                spent -= cost
                self.guided_turn[request_id] = turn
                self.let_in.discard(request_id)
        self.starting = {}
        # Only steps with plain rows are timed: theirs is the time the share is of.
        plain = out.total_num_scheduled_tokens > sum(out.num_scheduled_tokens.get(r, 0) for r in self.let_in)
        self.in_flight.append((time.perf_counter(), plain, spent))
        return out

    def update_from_output(self, scheduler_output: SchedulerOutput, *args, **kwargs):
        # A step runs from when it was scheduled, or when the one before it ended (async
        # scheduling plans a step while the previous one runs), until its output arrives.
        now = time.perf_counter()
        if self.in_flight:
            scheduled_at, plain, spent = self.in_flight.popleft()
            if plain:
                self.step_times.add(spent, now - max(scheduled_at, self.last_output))
        outputs = super().update_from_output(scheduler_output, *args, **kwargs)
        self.last_output = time.perf_counter()
        return outputs

    def step_credit(self, plain_running: bool) -> float | None:
        """Guide tokens of credit this step adds: the budget, held to the time share while plain
        sequences run. None: a probe, a step without guided rows."""
        if self.time_share <= 0 or not plain_running:
            return self.guide_budget
        fit = self.step_times.fit()
        if self.step_times.since_plain >= (PROBE_EVERY if fit is None else REFRESH_EVERY):
            return None
        if fit is None:
            return self.guide_budget
        plain_seconds, token_seconds = fit
        credit = min(self.guide_budget, self.time_share * plain_seconds / token_seconds)
        if time.monotonic() - self.logged_at > 60:
            self.logged_at = time.monotonic()
            log.info("guide credit %.0f tokens a step: steps take %.3f s without guides, a guide token %.2f ms",
                     credit, plain_seconds, 1e3 * token_seconds)
        return credit

    def _handle_blocked_waiting_request(self, request: Request) -> bool:
        if not super()._handle_blocked_waiting_request(request):
            return False
        return self.guide_budget <= 0 or request.request_id in self.starting or self._guide_cost(request) == 0

    def _take_turns(self, step: int) -> float:
        """Let guided sequences into this step in turn order; returns their guide tokens."""
        self.alignments = {r.request_id: self.alignments[r.request_id]
                           for r in chain(self.running, self.waiting) if r.request_id in self.alignments}
        running = [(r, c, False) for r in self.running if (c := self._guide_cost(r)) > 0]
        new = [(r, c, True) for r in self.waiting if (c := self._first_step_cost(r)) > 0]
        guided = running + new
        # A new request's turn counts from its arrival.
        self.guided_turn = {r.request_id: self.guided_turn.get(r.request_id, -1 if not is_new else step)
                            for r, _, is_new in guided}
        self.starting = {}
        self.let_in = set()
        if not guided:
            self.guide_credit = 0.0
            return 0.0
        guided.sort(key=lambda g: self.guided_turn[g[0].request_id])
        # Rows that did not make the guided lists are plain, running or about to start.
        plain = len(running) < len(self.running) or len(new) < len(self.waiting)
        credit = self.step_credit(plain_running=plain)
        if credit is not None:
            cap = max(credit, max(c for _, c, _ in guided))
            self.guide_credit = min(self.guide_credit + credit, cap)
        spent, waiting = 0.0, credit is None
        for request, cost, is_new in guided:
            # In turn order: once one cannot run, the later ones wait too, so the credit builds
            # up for it instead of going to cheaper sequences behind it.
            if not waiting and cost <= self.guide_credit:
                self.guide_credit -= cost
                spent += cost
                self.let_in.add(request.request_id)
                if is_new:
                    self.starting[request.request_id] = (cost, self.guided_turn[request.request_id])
                self.guided_turn[request.request_id] = step
            else:
                waiting = True
                if not is_new:
                    request.next_decode_eligible_step = max(request.next_decode_eligible_step, step + 1)
        return spent


class GuideBudgetScheduler(GuideBudget, Scheduler):
    pass


class GuideBudgetAsyncScheduler(GuideBudget, AsyncScheduler):
    pass
