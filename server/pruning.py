"""best_of_n with `prune` (Speculative Rejection): the samples of a choice run as separate engine
requests; at each checkpoint the server reads the reward of every live sample's text so far,
which the engine step kept as the sample's reward caches advanced (decoders/best_of_n.py), and
aborts the lowest-scoring ones: their engine and guide caches are freed at once.

Samples run at their own pace (the scheduler may hold one back), so a checkpoint is decided once
every running sample of the choice has passed it, over every sample that passed it, finished or
not: the outcome does not depend on timing. A fast sample may have made a few tokens more by
then; they count in `sampled_tokens`. A sample whose checkpoint reward is missing (its reward
failed) ranks below every scored one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vllm import SamplingParams
from vllm.outputs import CompletionOutput
from vllm.sampling_params import RequestOutputKind

from alignd.decoders.params import to_extra_args
from alignd.server.schemas import PruneCheckpoint

if TYPE_CHECKING:
    from alignd.server.generate import Plan


@dataclass
class Pruned:
    at: int  # the checkpoint (generated tokens) it was stopped at
    total: float | None  # its weighted reward there


@dataclass
class Samples:
    outputs: list[CompletionOutput]  # every sample, the pruned ones as far as they got
    pruned: dict[int, Pruned] = field(default_factory=dict)
    checkpoints: dict[int, list[PruneCheckpoint]] = field(default_factory=dict)  # by choice


def sample_params(plan: Plan, i: int, g: int) -> SamplingParams:
    """Sample g of prompt i alone; seeded as vLLM seeds the g-th sample of an n-sample request, so
    `keep: 1.0` draws exactly the samples of plain best-of-n."""
    params = plan.sampling[i].clone()
    params.n = 1
    params.seed = None if params.seed is None else params.seed + g
    params.output_kind = RequestOutputKind.CUMULATIVE
    assert plan.alignment is not None
    params.extra_args = to_extra_args(plan.alignment, plan.request_id, sample=sample_id(plan, i, g))
    return params


def sample_id(plan: Plan, i: int, g: int) -> str:
    return f"{plan.sub_id(i)}-s{g}"


async def samples(plan: Plan, i: int, prompt: list[int]) -> Samples:
    al = plan.alignment
    assert al is not None and al.prune is not None
    count = plan.sampling[i].n
    latest: dict[int, CompletionOutput] = {}
    changed = asyncio.Event()
    failures: list[BaseException] = []

    async def pump(g: int) -> None:
        try:
            async for out in plan.engine.generate(prompt, sample_params(plan, i, g), sample_id(plan, i, g)):
                latest[g] = out.outputs[0]
                changed.set()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # handed to the loop below, which raises it
            failures.append(e)
        changed.set()

    tasks = {g: asyncio.create_task(pump(g)) for g in range(count)}
    out = Samples([])
    nxt = dict.fromkeys(range(plan.req.n), al.prune.every)  # each choice's next checkpoint
    try:
        while any(_running(latest, out, g) for g in range(count)):
            await changed.wait()
            changed.clear()
            if failures:
                raise failures[0]
            for j in nxt:
                await _decide(plan, i, j, nxt, latest, out, tasks)
        for j in nxt:  # the checkpoints that samples which have all finished passed
            await _decide(plan, i, j, nxt, latest, out, tasks)
    finally:
        for t in tasks.values():
            t.cancel()  # an aborted generate frees its engine request
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    out.outputs = [latest[g] for g in range(count)]
    return out


def _running(latest: dict[int, CompletionOutput], out: Samples, g: int) -> bool:
    return g not in out.pruned and (g not in latest or latest[g].finish_reason is None)


def _made(latest: dict[int, CompletionOutput], g: int) -> int:
    return len(latest[g].token_ids) if g in latest else 0


async def _decide(plan: Plan, i: int, j: int, nxt: dict[int, int], latest: dict[int, CompletionOutput],
                  out: Samples, tasks: dict[int, asyncio.Task]) -> None:
    """Every checkpoint of choice j that its running samples have all passed: of the samples that
    passed it (finished ones too, so that the outcome does not depend on timing), stop the worst."""
    al = plan.alignment
    assert al is not None and al.prune is not None
    group = range(j * al.n, (j + 1) * al.n)
    while True:
        at = nxt[j]
        # A sample has passed `at` once it made token at + 1: the engine step that sampled that
        # token kept the reward of its first `at` tokens.
        if any(_running(latest, out, g) and _made(latest, g) <= at for g in group):
            return
        live = [g for g in group if g not in out.pruned and _made(latest, g) > at]
        if len(live) <= 1:
            return
        totals = await plan.engine.rpc("alignd_checkpoints", plan.request_id, [sample_id(plan, i, g) for g in live], at)
        ranked = sorted(zip(live, totals), key=lambda gt: float("-inf") if gt[1] is None else gt[1], reverse=True)
        stop = ranked[al.prune.kept(len(live)):]
        for g, total in stop:
            tasks[g].cancel()
            out.pruned[g] = Pruned(at, total)
        out.checkpoints.setdefault(j, []).append(PruneCheckpoint(at=at, live=len(live), pruned=len(stop)))
        nxt[j] = at + al.prune.every
