"""From a validated request to choices: sampling parameters, in-engine decoders, best-of-n.

Both endpoints reduce to prompts (token ids) x `n` choices. In-engine decoders (ARGS) ride on
the request's SamplingParams; best-of-n draws `n x alignment.n` plain samples and ranks each
choice's group with the worker's reward models. Either way each choice reports the rewards of
the text it returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from alignd.decoders.params import IN_ENGINE, OWN_SUPPORT, AlignmentParams
from alignd.server.engine import Engine
from alignd.server.schemas import Candidate, ChoiceAlignment, SamplingFields


class BadRequest(ValueError):
    """Invalid input that only the server can see (context length, ...): HTTP 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    alignment: ChoiceAlignment | None = None


@dataclass
class Delta:
    """One streamed piece of one choice; the last one has a finish_reason (and alignment)."""

    index: int
    text: str
    finish_reason: str | None = None
    alignment: ChoiceAlignment | None = None


@dataclass
class Plan:
    """What one HTTP request asks of the engine."""

    request_id: str
    prompts: list[list[int]]
    req: SamplingFields
    max_tokens: int | None
    engine: Engine
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})

    def __post_init__(self) -> None:
        limit = self.engine.max_model_len
        for i, p in enumerate(self.prompts):
            room = limit - len(p)
            if room < 1:
                raise BadRequest(
                    f"prompt {i} has {len(p)} tokens; the model's context is {limit} tokens", "prompt"
                )
            if self.max_tokens is not None and self.max_tokens > room:
                raise BadRequest(
                    f"max_tokens={self.max_tokens} does not fit: prompt {i} has {len(p)} tokens and "
                    f"the model's context is {limit}; ask for at most {room}",
                    "max_tokens",
                )
        self.usage["prompt_tokens"] = sum(len(p) for p in self.prompts)

    @property
    def alignment(self) -> AlignmentParams | None:
        return self.req.alignment

    def params(self, prompt: list[int], kind: RequestOutputKind) -> SamplingParams:
        req, al = self.req, self.alignment
        n, extra, top_p = req.n, None, req.top_p
        if al is not None and al.decoder in IN_ENGINE:
            extra = {"alignd": al.engine_args(), "alignd_request": self.request_id}
            if al.decoder in OWN_SUPPORT:
                top_p = 1.0  # the decoder's candidates are the support; top-p would cut them
        elif al is not None and al.decoder == "best_of_n":
            n = req.n * al.n
        return SamplingParams(
            n=n,
            max_tokens=self.max_tokens or self.engine.max_model_len - len(prompt),
            temperature=req.temperature,
            top_p=top_p,
            seed=req.seed,
            stop=req.stop or None,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            output_kind=kind,
            extra_args=extra,
        )

    def total(self, rewards: dict[str, float]) -> float:
        assert self.alignment is not None
        return sum(w * rewards[name] for name, w in self.alignment.rewards.items())

    async def rewards_of(self, seqs: list[list[int]]) -> tuple[list[dict[str, float]], list[str]]:
        assert self.alignment is not None
        done = await self.engine.finish(seqs, list(self.alignment.rewards), self.request_id)
        return done["rewards"], done["notes"]

    def sub_id(self, i: int) -> str:
        return f"{self.request_id}-{i}"


async def _final_outputs(plan: Plan, i: int, prompt: list[int]):
    outputs = None
    async for out in plan.engine.generate(prompt, plan.params(prompt, RequestOutputKind.FINAL_ONLY), plan.sub_id(i)):
        outputs = out.outputs
    assert outputs is not None
    return sorted(outputs, key=lambda o: o.index)


async def _best_of_n(plan: Plan, i: int, prompt: list[int]) -> list[Choice]:
    al = plan.alignment
    assert al is not None
    samples = await _final_outputs(plan, i, prompt)
    plan.usage["completion_tokens"] += sum(len(s.token_ids) for s in samples)
    rewards, notes = await plan.rewards_of([prompt + list(s.token_ids) for s in samples])
    choices = []
    for j in range(plan.req.n):
        group = range(j * al.n, (j + 1) * al.n)
        best = max(group, key=lambda g: plan.total(rewards[g]))
        ids = plan.req.return_token_ids
        cands = [
            Candidate(
                text=samples[g].text,
                rewards=rewards[g],
                total=plan.total(rewards[g]),
                token_ids=list(samples[g].token_ids) if ids else None,
            )
            for g in group
        ]
        s = samples[best]
        choices.append(
            Choice(
                i * plan.req.n + j,
                s.text,
                list(s.token_ids),
                s.finish_reason,
                ChoiceAlignment(
                    decoder=al.decoder,
                    rewards=rewards[best],
                    total=plan.total(rewards[best]),
                    candidates=cands if al.return_candidates else None,
                    notes=notes or None,
                ),
            )
        )
    return choices


async def _guided_or_plain(plan: Plan, i: int, prompt: list[int]) -> list[Choice]:
    outputs = await _final_outputs(plan, i, prompt)
    plan.usage["completion_tokens"] += sum(len(o.token_ids) for o in outputs)
    choices = [
        Choice(i * plan.req.n + o.index, o.text, list(o.token_ids), o.finish_reason) for o in outputs
    ]
    if plan.alignment is not None:
        rewards, notes = await plan.rewards_of([prompt + c.token_ids for c in choices])
        for c, r in zip(choices, rewards):
            c.alignment = ChoiceAlignment(
                decoder=plan.alignment.decoder, rewards=r, total=plan.total(r), notes=notes or None
            )
    return choices


def _runner(plan: Plan):
    al = plan.alignment
    return _best_of_n if al is not None and al.decoder == "best_of_n" else _guided_or_plain


async def run(plan: Plan) -> list[Choice]:
    per_prompt = await asyncio.gather(*(_runner(plan)(plan, i, p) for i, p in enumerate(plan.prompts)))
    return sorted((c for cs in per_prompt for c in cs), key=lambda c: c.index)


async def _stream_prompt(plan: Plan, i: int, prompt: list[int]) -> AsyncIterator[Delta]:
    al = plan.alignment
    if al is not None and al.decoder == "best_of_n":
        # The winner is known only when every sample has finished: it comes as one piece.
        for c in await _best_of_n(plan, i, prompt):
            yield Delta(c.index, c.text)
            yield Delta(c.index, "", c.finish_reason, c.alignment)
        return
    tokens: dict[int, list[int]] = {}
    params = plan.params(prompt, RequestOutputKind.DELTA)
    async for out in plan.engine.generate(prompt, params, plan.sub_id(i)):
        for o in out.outputs:
            tokens.setdefault(o.index, []).extend(o.token_ids)
            plan.usage["completion_tokens"] += len(o.token_ids)
            index = i * plan.req.n + o.index
            if o.finish_reason is None:
                if o.text:
                    yield Delta(index, o.text)
                continue
            alignment = None
            if al is not None:
                rewards, notes = await plan.rewards_of([prompt + tokens[o.index]])
                alignment = ChoiceAlignment(
                    decoder=al.decoder, rewards=rewards[0], total=plan.total(rewards[0]), notes=notes or None
                )
            yield Delta(index, o.text, o.finish_reason, alignment)


async def stream(plan: Plan) -> AsyncIterator[Delta]:
    """Deltas of every choice of every prompt, interleaved as they come."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, prompt: list[int]) -> None:
        try:
            async for delta in _stream_prompt(plan, i, prompt):
                await queue.put(delta)
        except BaseException as e:  # hand failures to the consumer, which re-raises them
            await queue.put(e)
            raise
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(plan.prompts)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        # A disconnected client lands here too: cancelling the pumps aborts their requests.
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
