"""`/v1/rewards`: the server's reward (and value) models over given texts or conversations, with
optional weights: the same numbers a choice's `alignment` block reports for its text."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request

from alignd.server.admission import Cost
from alignd.server.checks import authorized, body_schema, fits, read_json
from alignd.server.errors import HTTPError
from alignd.server.schemas import ChatMessage
from alignd.server.service_schemas import RewardScore, RewardsRequest, RewardsResponse, RewardsUsage
from alignd.server.serving import Served, Shared, failure

router = APIRouter(dependencies=[Depends(authorized)])


def weights(asked: dict[str, float] | list[str] | None, configured: dict[str, str], kind: str,
            default_all: bool) -> dict[str, float]:
    if asked is None:
        return dict.fromkeys(configured, 1.0) if default_all else {}
    named = asked if isinstance(asked, dict) else dict.fromkeys(asked, 1.0)
    unknown = [n for n in named if n not in configured]
    if unknown:
        raise HTTPError(400, f"unknown {kind} {unknown[0]!r}; configured {kind}s: {sorted(configured) or 'none'}",
                        f"{kind}s")
    return named


def encode(shared: Served, item: str | list[int] | list[ChatMessage]) -> list[int]:
    engine = shared.engine
    if isinstance(item, str):
        fits(engine, item)
        return engine.encode(item)
    if item and isinstance(item[0], ChatMessage):
        messages = [m.template_dict() for m in item]  # type: ignore[union-attr]
        fits(engine, "".join(m["content"] for m in messages))
        return engine.encode_chat(messages, generation_prompt=False)
    return list(item)  # type: ignore[arg-type]


@router.post("/v1/rewards", response_model=RewardsResponse, openapi_extra=body_schema(RewardsRequest))
async def rewards(request: Request, shared: Shared) -> RewardsResponse:
    req = await read_json(request, RewardsRequest, shared.settings.max_request_bytes)
    settings, engine = shared.settings, shared.engine
    refusal = shared.admission.refusal()
    if refusal is not None:
        raise refusal
    if req.model != settings.model_name:
        raise HTTPError(404, f"model {req.model!r} does not exist; this server serves {settings.model_name!r}", "model")
    reward_weights = weights(req.rewards, settings.rewards, "reward", default_all=req.values is None)
    value_weights = weights(req.values, settings.values, "value", default_all=False)
    if not reward_weights and not value_weights:
        raise HTTPError(400, "this server has no reward model to score with (start it with --reward NAME=SPEC)",
                        "rewards")
    items = req.inputs()
    if len(items) > settings.max_samples_per_request:
        raise HTTPError(400, f"{len(items)} inputs; this server scores at most {settings.max_samples_per_request} "
                             "per request (--max-samples-per-request)", "input")
    cost = Cost(len(items), 0)
    try:
        seqs = await asyncio.to_thread(lambda: [encode(shared, item) for item in items])
    except ValueError as e:
        raise HTTPError(400, str(e), "input") from None
    for i, seq in enumerate(seqs):
        if not seq or len(seq) > engine.max_model_len or not all(0 <= t < engine.vocab_limit for t in seq):
            raise HTTPError(400, f"input {i}: {len(seq)} tokens; each input must have 1 to {engine.max_model_len} "
                                 f"tokens of the vocabulary (0 to {engine.vocab_limit - 1})", "input")
    await shared.admission.enter(cost)
    try:
        scores = {kind: await engine.finish(seqs, list(w), f"rewards-{id(req)}", kind)
                  for kind, w in (("reward", reward_weights), ("value", value_weights)) if w}
    except Exception as e:
        status, message = failure(e)
        raise HTTPError(status, message) from None
    finally:
        shared.admission.leave(cost)
    data = []
    for i, seq in enumerate(seqs):
        got = {kind: s["rewards"][i] for kind, s in scores.items()}
        notes = [f"{kind} {name!r} failed on this input ({why})" for kind, s in scores.items()
                 for name, why in s["failed"][i].items()]
        pairs = [(w, got[kind].get(name)) for kind, ws in (("reward", reward_weights), ("value", value_weights))
                 for name, w in ws.items()]
        total = None if any(v is None for _, v in pairs) else sum(w * v for w, v in pairs)
        data.append(RewardScore(index=i, rewards=got.get("reward", {}), values=got.get("value"), total=total,
                                tokens=len(seq), notes=notes or None))
    used = sum(len(s) for s in seqs)
    return RewardsResponse(model=settings.model_name, data=data, usage=RewardsUsage(prompt_tokens=used, total_tokens=used))
