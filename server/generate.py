"""From a validated request to choices: sampling parameters, in-engine decoders, best-of-n.

Both endpoints reduce to prompts (token ids) x `n` choices. In-engine decoders (ARGS) ride on
the request's SamplingParams; best-of-n draws `n x alignment.n` plain samples (pruned on the way:
pruning.py) and ranks each choice's group with the worker's reward models; blockwise search
ranks blocks round after round (block_search.py). Each choice reports the rewards of its text.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

from alignd.decoders.cost import candidate_formula, candidate_tokens, guide_tokens
from alignd.decoders.params import AlignmentParams, to_extra_args
from alignd.server import block_search, logprobs, pruning
from alignd.server.admission import Cost
from alignd.server.engine import Engine
from alignd.server.logprobs import TokenLogprob
from alignd.server.pieces import Choice, Delta, merged
from alignd.server.schemas import Candidate, ChoiceAlignment, SamplingFields


class BadRequest(ValueError):
    """Invalid input that only the server can see (context length, ...): HTTP 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def bad_request(e: VLLMValidationError, param: str | None = None) -> BadRequest:
    return BadRequest(str(e).split(" (parameter=")[0], e.parameter or param)


@dataclass
class Plan:
    """What one HTTP request asks of the engine, checked against everything the engine would
    refuse, so that a bad request is a 400 before anything runs (and before a stream starts)."""

    request_id: str
    prompts: list[list[int]]
    req: SamplingFields
    max_tokens: int | None
    engine: Engine
    echo: list[str] | None = None  # completions' `echo`: each prompt's text, put before its choices' text
    # completion_tokens: of the text returned; generated_tokens: all the engine made (best-of-n's
    # unreturned samples too).
    usage: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("prompt_tokens", "completion_tokens", "generated_tokens"), 0))

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
            self._in_vocab(p, f"prompt {i}", "prompt")
        self._in_vocab(self.req.stop_token_ids, "stop_token_ids", "stop_token_ids")
        self._in_vocab(list(self.req.logit_bias or ()), "logit_bias", "logit_bias")
        al = self.alignment
        if al is not None and al.method.own_support:
            for name, off in (("top_k", self.req.top_k in (None, 0, -1)), ("min_p", self.req.min_p == 0)):
                if not off:
                    raise BadRequest(f"{al.decoder} samples among its own candidates (alignment.top_k): "
                                     f"{name} would cut them; leave it out", name)
        if self.ranked and self.req.temperature == 0 and self.req.n * al.n > 1:
            raise BadRequest(f"{al.decoder} ranks different samples, and at temperature 0 every sample is the same: "
                             "use a temperature > 0 (or alignment.n = 1)", "temperature")
        self.usage["prompt_tokens"] = sum(len(p) for p in self.prompts)
        kind = RequestOutputKind.DELTA if self.req.stream and not self.ranked else RequestOutputKind.FINAL_ONLY
        try:
            constraint = self.req.constraint()
            self.constraint = StructuredOutputsParams(**constraint) if constraint is not None else None
            self.sampling = [self._params(p, kind) for p in self.prompts]
        except VLLMValidationError as e:
            raise bad_request(e) from None

    def check_constraint(self) -> None:
        """What the engine would refuse about the output constraint (an invalid schema, regex or
        grammar), as a 400 before anything runs; compiling it takes time: call it in a thread."""
        if self.constraint is not None:
            param = "structured_outputs" if self.req.structured_outputs else "response_format"
            try:
                self.engine.check(self.sampling[0])
            except VLLMValidationError as e:
                raise bad_request(e, param) from None
            except Exception as e:  # noqa: BLE001 - the backends raise what they raise on a constraint they refuse
                raise BadRequest(f"the output constraint does not compile ({type(e).__name__}: {e})", param) from None

    def _in_vocab(self, ids: list[int], what: str, param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.engine.vocab_limit), None)
        if bad is not None:
            raise BadRequest(f"{what}: token id {bad} is not in the vocabulary (0 to {self.engine.vocab_limit - 1})",
                             param)

    @property
    def alignment(self) -> AlignmentParams | None:
        return self.req.alignment

    @property
    def in_engine(self) -> bool:
        return self.alignment is not None and self.alignment.in_engine

    @property
    def blockwise(self) -> bool:
        return self.alignment is not None and self.alignment.method.blocks

    @property
    def ranked(self) -> bool:
        """Request-level: the engine draws alignment.n plain samples per choice, ranked here."""
        return self.alignment is not None and self.alignment.method.rank is not None

    def _max_tokens(self, prompt: list[int]) -> int:
        return self.max_tokens or self.engine.max_model_len - len(prompt)

    def _params(self, prompt: list[int], kind: RequestOutputKind) -> SamplingParams:
        req, al = self.req, self.alignment
        n, extra, top_p = req.n, None, req.top_p
        if al is not None and self.in_engine:
            extra = to_extra_args(al, self.request_id)
            if al.method.own_support:
                top_p = 1.0  # the decoder's candidates are the support; top-p would cut them
        if al is not None and self.ranked:
            n = req.n * al.n
        return SamplingParams(
            n=n,
            max_tokens=self._max_tokens(prompt),
            temperature=req.temperature,
            top_p=top_p,
            seed=req.seed,
            stop=req.stop or None,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            top_k=min(req.top_k or 0, self.engine.vocab_limit),  # k over the vocabulary is k = all
            min_p=req.min_p,
            stop_token_ids=req.stop_token_ids or None,
            logit_bias=req.logit_bias,
            structured_outputs=self.constraint,
            logprobs=req.top_logprobs_asked(),
            ignore_eos=req.ignore_eos,
            min_tokens=req.min_tokens,
            output_kind=kind,
            extra_args=extra,
        )

    def cost(self, max_candidate_tokens: int) -> Cost:
        """Sequences and guide tokens per step; a 400 if one sequence's guided step exceeds
        `max_candidate_tokens`."""
        al = self.alignment
        samples = sum(p.n for p in self.sampling)
        if al is None or not self.in_engine:
            return Cost(samples, 0)
        per_row = candidate_tokens(al)
        if per_row > max_candidate_tokens:
            raise BadRequest(
                f"{al.decoder}: {candidate_formula(al)} = {per_row:,} candidate tokens per step exceeds this "
                f"server's limit of {max_candidate_tokens:,} (--max-guide-tokens-per-step)", "alignment"
            )
        routes = self.engine.routes
        tokens = sum(p.n * guide_tokens(al, routes, len(prompt) + self._max_tokens(prompt))
                     for p, prompt in zip(self.sampling, self.prompts))
        return Cost(samples, tokens)

    def alignment_block(self, rewards: dict[str, float], notes: list[str], **extra) -> ChoiceAlignment:
        """A choice's `alignment`: the rewards of its text, their total, what went wrong."""
        assert self.alignment is not None
        return ChoiceAlignment(decoder=self.alignment.decoder, rewards=rewards, total=self.total(rewards),
                               notes=notes or None, **extra)

    def total(self, rewards: dict[str, float]) -> float | None:
        """The weighted reward of a text, or None when one of its rewards failed."""
        assert self.alignment is not None
        weights = self.alignment.rewards
        if any(name not in rewards for name in weights):
            return None
        return sum(w * rewards[name] for name, w in weights.items())

    async def rewards_of(self, seqs: list[list[int]]) -> tuple[list[dict[str, float]], list[list[str]], list[str]]:
        """Each sequence's rewards, its own notes (rewards that failed on it), the request's notes."""
        assert self.alignment is not None
        done = await self.engine.finish(seqs, list(self.alignment.rewards), self.request_id)
        own = [[f"reward {name!r} failed on this text ({why}); it has no total" for name, why in failed.items()]
               for failed in done["failed"]]
        return done["rewards"], own, done["notes"]

    def sub_id(self, i: int) -> str:
        return f"{self.request_id}-{i}"

    def token_logprobs(self, o) -> list[TokenLogprob] | None:
        """A vLLM output's per-token logprobs, when the request asks for them."""
        top = self.req.top_logprobs_asked()
        return None if top is None else logprobs.from_engine(o.token_ids, o.logprobs, top)

    async def with_base(self, prompt: list[int], tokens: list[int], got: list[TokenLogprob] | None,
                        request_id: str) -> dict[str, float | None]:
        """For an aligned request asking for logprobs: each token's base-model logprob, set in
        `got`, and the choice's sums; {} otherwise."""
        if got is None or self.alignment is None:
            return {}
        base = await self.engine.prompt_logprobs(prompt + tokens, f"{request_id}-base")
        for t, b in zip(got, base[len(prompt):]):
            t.base = None if b is None else logprobs.finite(b)
        return logprobs.sums(got)


async def _final_outputs(plan: Plan, i: int, prompt: list[int]):
    outputs = None
    async for out in plan.engine.generate(prompt, plan.sampling[i], plan.sub_id(i)):
        outputs = out.outputs
    assert outputs is not None
    return sorted(outputs, key=lambda o: o.index)


async def _ranked(plan: Plan, i: int, prompt: list[int]) -> list[Choice]:
    al = plan.alignment
    assert al is not None and al.method.rank is not None
    drawn = await pruning.samples(plan, i, prompt) if al.prune else pruning.Samples(await _final_outputs(plan, i, prompt))
    samples, pruned = drawn.outputs, drawn.pruned
    plan.usage["generated_tokens"] += sum(len(s.token_ids) for s in samples)
    done = [g for g in range(len(samples)) if g not in pruned]  # a pruned sample has no final reward
    rewards: list[dict[str, float]] = [{} for _ in samples]
    own: list[list[str]] = [[] for _ in samples]
    scored, scored_own, notes = await plan.rewards_of([prompt + list(samples[g].token_ids) for g in done])
    for g, r, o in zip(done, scored, scored_own):
        rewards[g], own[g] = r, o
    totals = [plan.total(r) if g not in pruned else None for g, r in enumerate(rewards)]
    choices = []
    for j in range(plan.req.n):
        group = range(j * al.n, (j + 1) * al.n)
        picked = al.method.rank([totals[g] for g in group])
        # If no sample can be ranked (every one has a failed reward), the first one not pruned stands.
        best = group[picked] if picked is not None else next(g for g in group if g not in pruned)
        why = [] if picked is not None else ["no sample of this choice has a total, so it is the first sample, unranked"]
        ids = plan.req.return_token_ids
        cands = [
            Candidate(
                text=samples[g].text,
                rewards=rewards[g],
                total=totals[g],
                token_ids=list(samples[g].token_ids) if ids else None,
                **({"pruned_at": pruned[g].at, "total_at_pruning": pruned[g].total} if g in pruned else {}),
            )
            for g in group
        ]
        prunes = {"pruning": drawn.checkpoints.get(j, []),
                  "unpruned_tokens": al.n * plan.sampling[i].max_tokens} if al.prune else {}
        s = samples[best]
        plan.usage["completion_tokens"] += len(s.token_ids)
        got = plan.token_logprobs(s)
        sums = await plan.with_base(prompt, list(s.token_ids), got, plan.sub_id(i * plan.req.n + j))
        alignment = plan.alignment_block(rewards[best], own[best] + why + notes,
                               candidates=cands if al.return_candidates else None,
                               sampled_tokens=sum(len(samples[g].token_ids) for g in group), **prunes, **sums)
        choices.append(Choice(i * plan.req.n + j, s.text, list(s.token_ids), s.finish_reason, alignment, got))
    return choices


async def _guided_or_plain(plan: Plan, i: int, prompt: list[int]) -> list[Choice]:
    outputs = await _final_outputs(plan, i, prompt)
    for key in ("completion_tokens", "generated_tokens"):
        plan.usage[key] += sum(len(o.token_ids) for o in outputs)
    choices = [
        Choice(i * plan.req.n + o.index, o.text, list(o.token_ids), o.finish_reason, logprobs=plan.token_logprobs(o))
        for o in outputs
    ]
    if plan.alignment is not None:
        rewards, own, notes = await plan.rewards_of([prompt + c.token_ids for c in choices])
        for c, r, mine in zip(choices, rewards, own):
            sums = await plan.with_base(prompt, c.token_ids, c.logprobs, plan.sub_id(c.index))
            c.alignment = plan.alignment_block(r, mine + notes, **sums)
    return choices


async def _blockwise(plan: Plan, i: int, prompt: list[int]) -> list[Choice]:
    choices: dict[int, Choice] = {}
    async for d in block_search.stream_prompt(plan, i, prompt):
        c = choices.setdefault(d.index, Choice(d.index, logprobs=None if d.logprobs is None else []))
        c.text += d.text
        c.token_ids += d.token_ids
        if c.logprobs is not None and d.logprobs is not None:
            c.logprobs += d.logprobs
        if d.finish_reason is not None:
            c.finish_reason, c.alignment = d.finish_reason, d.alignment
            if c.alignment is not None:
                c.alignment.base_logprobs = None  # a whole choice has them per token
    return list(choices.values())


def _runner(plan: Plan):
    return _blockwise if plan.blockwise else _ranked if plan.ranked else _guided_or_plain


async def run(plan: Plan) -> list[Choice]:
    per_prompt = await asyncio.gather(*(_runner(plan)(plan, i, p) for i, p in enumerate(plan.prompts)))
    choices = sorted((c for cs in per_prompt for c in cs), key=lambda c: c.index)
    if plan.echo is not None:
        for c in choices:
            c.text = plan.echo[c.index // plan.req.n] + c.text
    return choices


async def _stream_prompt(plan: Plan, i: int, prompt: list[int]) -> AsyncIterator[Delta]:
    if plan.blockwise:  # each accepted block as soon as it is chosen
        async for d in block_search.stream_prompt(plan, i, prompt):
            yield d
        return
    if plan.ranked:
        # The winner is known only when every sample has finished: it comes as one piece.
        for c in await _ranked(plan, i, prompt):
            yield Delta(c.index, c.text, logprobs=c.logprobs)
            if c.logprobs is not None and c.alignment is not None:
                c.alignment.base_logprobs = [t.base for t in c.logprobs]  # as in-engine streams have them
            yield Delta(c.index, "", c.finish_reason, c.alignment, [] if c.logprobs is not None else None)
        return
    tokens: dict[int, list[int]] = {}
    sampled: dict[int, list[TokenLogprob]] = {}
    async for out in plan.engine.generate(prompt, plan.sampling[i], plan.sub_id(i)):
        for o in out.outputs:
            tokens.setdefault(o.index, []).extend(o.token_ids)
            got = plan.token_logprobs(o)
            sampled.setdefault(o.index, []).extend(got or [])
            plan.usage["completion_tokens"] += len(o.token_ids)
            plan.usage["generated_tokens"] += len(o.token_ids)
            index = i * plan.req.n + o.index
            if o.finish_reason is None:
                if o.text or got:
                    yield Delta(index, o.text, logprobs=got)
                continue
            alignment = None
            if plan.alignment is not None:
                rewards, own, notes = await plan.rewards_of([prompt + tokens[o.index]])
                whole = sampled[o.index] if got is not None else None
                sums = await plan.with_base(prompt, tokens[o.index], whole, plan.sub_id(index))
                base = {"base_logprobs": [t.base for t in whole]} if sums and whole is not None else {}
                alignment = plan.alignment_block(rewards[0], own[0] + notes, **sums, **base)
            yield Delta(index, o.text, o.finish_reason, alignment, got)


async def stream(plan: Plan, interrupt: Callable[[], Awaitable[BaseException]] | None = None) -> AsyncIterator[Delta]:
    """Deltas of every choice of every prompt, interleaved as they come; if `interrupt()` returns
    first, its exception ends the stream (its requests are aborted)."""
    echoed: set[int] = set()
    written: dict[int, int] = {}
    async for item in merged([_stream_prompt(plan, i, p) for i, p in enumerate(plan.prompts)], interrupt):
        if plan.echo is not None and item.index not in echoed:
            echoed.add(item.index)
            item.text = plan.echo[item.index // plan.req.n] + item.text
        item.offset = written.get(item.index, 0)
        written[item.index] = item.offset + len(item.text)
        yield item
