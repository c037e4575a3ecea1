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
"""

from __future__ import annotations

from itertools import chain

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from alignd.decoders.cost import guide_tokens
from alignd.decoders.params import IN_ENGINE, AlignmentParams, from_extra_args


class GuideBudget:
    """Mixed into vLLM's Scheduler (or AsyncScheduler): holds guided sequences beyond the budget."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        config = (self.vllm_config.additional_config or {}).get("alignd") or {}
        self.guide_budget = float(config.get("guide_step_budget") or 0)
        self.guide_credit = 0.0
        self.guided_turn: dict[str, int] = {}  # request id -> the last step it was guided in (or arrived)
        self.alignments: dict[str, AlignmentParams | None] = {}  # request id -> what it asks
        self.starting: dict[str, tuple[float, int]] = {}  # new requests paid for this step: cost, turn before

    def _guide_cost(self, request: Request) -> int:
        if request.request_id not in self.alignments:
            al = from_extra_args(request.sampling_params.extra_args) if request.sampling_params else None
            self.alignments[request.request_id] = al if al is not None and al.decoder in IN_ENGINE else None
        al = self.alignments[request.request_id]
        return 0 if al is None else guide_tokens(al, {}, request.num_tokens)

    def _first_step_cost(self, request: Request) -> int:
        cost = self._guide_cost(request)
        return cost + request.num_prompt_tokens if cost > 0 else 0

    def schedule(self, *args, **kwargs) -> SchedulerOutput:
        if self.guide_budget <= 0:
            return super().schedule(*args, **kwargs)
        self._take_turns(self.current_step + 1)  # schedule() counts this step first
        out = super().schedule(*args, **kwargs)
        # A new request paid for but not started (no KV room, token budget spent) gets its
        # credit back and keeps its place in the turn order.
        started = {new.req_id for new in out.scheduled_new_reqs}
        for request_id, (cost, turn) in self.starting.items():
            if request_id not in started:
                self.guide_credit += cost
                self.guided_turn[request_id] = turn
        self.starting = {}
        return out

    def _handle_blocked_waiting_request(self, request: Request) -> bool:
        if not super()._handle_blocked_waiting_request(request):
            return False
        return self.guide_budget <= 0 or request.request_id in self.starting or self._guide_cost(request) == 0

    def _take_turns(self, step: int) -> None:
        self.alignments = {r.request_id: self.alignments[r.request_id]
                           for r in chain(self.running, self.waiting) if r.request_id in self.alignments}
        running = [(r, c, False) for r in self.running if (c := self._guide_cost(r)) > 0]
        new = [(r, c, True) for r in self.waiting if (c := self._first_step_cost(r)) > 0]
        guided = running + new
        # A new request's turn counts from its arrival.
        self.guided_turn = {r.request_id: self.guided_turn.get(r.request_id, -1 if not is_new else step)
                            for r, _, is_new in guided}
        self.starting = {}
        if not guided:
            self.guide_credit = 0.0
            return
        guided.sort(key=lambda g: self.guided_turn[g[0].request_id])
        cap = max(self.guide_budget, max(c for _, c, _ in guided))
        self.guide_credit = min(self.guide_credit + self.guide_budget, cap)
        waiting = False
        for request, cost, is_new in guided:
            # In turn order: once one cannot run, the later ones wait too, so the credit builds
            # up for it instead of going to cheaper sequences behind it.
            if not waiting and cost <= self.guide_credit:
                self.guide_credit -= cost
                if is_new:
                    self.starting[request.request_id] = (cost, self.guided_turn[request.request_id])
                self.guided_turn[request.request_id] = step
            else:
                waiting = True
                if not is_new:
                    request.next_decode_eligible_step = max(request.next_decode_eligible_step, step + 1)


class GuideBudgetScheduler(GuideBudget, Scheduler):
    pass


class GuideBudgetAsyncScheduler(GuideBudget, AsyncScheduler):
    pass
