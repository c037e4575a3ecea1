"""Blockwise search at the request level (decoders/blockwise.py): each choice repeats draw n
blocks, score them, keep the best, and streams every accepted block as soon as it is chosen.

Each round's blocks are one engine request of n samples from prompt + accepted tokens. Its
seed, when the request has one, is seed + (round x choices + choice) x n, so round r of choice j
draws what a plain request with that seed and n draws from the same prefix. The worker scores
the blocks against the choice's own cached reward prefix, in calls of at most a step's guide
budget in tokens, so no call holds the engine longer than a guided step may.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from vllm.sampling_params import RequestOutputKind

from alignd.server.logprobs import TokenLogprob
from alignd.server.pieces import Delta, merged

if TYPE_CHECKING:
    from alignd.server.generate import Plan


def stream_prompt(plan: Plan, i: int, prompt: list[int]) -> AsyncIterator[Delta]:
    """The pieces of every choice of prompt i, as they are accepted (choices run side by side)."""
    return merged([_choice(plan, i, j, prompt) for j in range(plan.req.n)])


async def _choice(plan: Plan, i: int, j: int, prompt: list[int]) -> AsyncIterator[Delta]:
    al = plan.alignment
    assert al is not None
    index, key = i * plan.req.n + j, f"{plan.sub_id(i)}-{j}"
    limit = plan.sampling[i].max_tokens
    accepted: list[int] = []
    sampled: list[TokenLogprob] | None = None if plan.req.top_logprobs_asked() is None else []
    made, reused, notes, rounds = 0, 0, [], 0
    try:
        while True:
            params = plan.sampling[i].clone()
            params.n, params.max_tokens = al.n, min(al.block_tokens, limit - len(accepted))
            params.seed = None if params.seed is None else params.seed + (rounds * plan.req.n + j) * al.n
            params.output_kind = RequestOutputKind.FINAL_ONLY
            outputs = None
            async for out in plan.engine.generate(prompt + accepted, params, f"{key}-r{rounds}"):
                outputs = sorted(out.outputs, key=lambda o: o.index)
                reused += out.num_cached_tokens or 0
            assert outputs is not None
            blocks = [list(o.token_ids) for o in outputs]
            made += sum(len(b) for b in blocks)
            rewards = await _score(plan, key, prompt + accepted, blocks)
            picked = al.method.rank([plan.total(r) for r in rewards])
            if picked is None:
                notes.append(f"round {rounds}: no block has a total, so it took the first, unranked")
            best = outputs[picked or 0]
            accepted += blocks[picked or 0]
            got = plan.token_logprobs(best)
            if sampled is not None and got is not None:
                sampled += got
            rounds += 1
            last = best.finish_reason == "stop" or len(accepted) >= limit
            if not last:
                yield Delta(index, best.text, logprobs=got, token_ids=blocks[picked or 0])
                continue
            plan.usage["completion_tokens"] += len(accepted)
            plan.usage["generated_tokens"] += made
            final, own, more = await plan.rewards_of([prompt + accepted])
            sums = await plan.with_base(prompt, accepted, sampled, f"{key}-base")
            base = {"base_logprobs": [t.base for t in sampled]} if sums and sampled is not None else {}
            alignment = plan.alignment_block(final[0], own[0] + notes + more, sampled_tokens=made,
                                             reused_prefix_tokens=reused, **sums, **base)
            yield Delta(index, best.text, best.finish_reason, alignment, got, token_ids=blocks[picked or 0])
            return
    finally:
        await asyncio.shield(_end(plan, key))


async def _score(plan: Plan, key: str, seq: list[int], blocks: list[list[int]]) -> list[dict[str, float]]:
    assert plan.alignment is not None
    rewards: list[dict[str, float]] = []
    for part in plan.engine.budgeted(blocks):
        got = await plan.engine.rpc("alignd_score_blocks", key, seq, blocks[part], list(plan.alignment.rewards))
        rewards += got["rewards"]
    return rewards


async def _end(plan: Plan, key: str) -> None:
    try:
        await plan.engine.rpc("alignd_end_search", key)
    except Exception:  # noqa: BLE001 - a dead engine has freed everything already
        pass
