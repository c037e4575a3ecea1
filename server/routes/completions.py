"""`/v1/completions`: text prompts or token ids, one or many."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from alignd.server import generate, logprobs
from alignd.server.checks import authorized, body_schema, check_request, fits, read_json
from alignd.server.schemas import Completion, CompletionChoice, CompletionChunk, CompletionRequest
from alignd.server.serving import Reply, Shared, serve

router = APIRouter(dependencies=[Depends(authorized)])


def choice(c: generate.Choice, token_ids: bool) -> CompletionChoice:
    lp = None if c.logprobs is None else logprobs.completion(c.logprobs, aligned=c.alignment is not None)
    return CompletionChoice(index=c.index, text=c.text, finish_reason=c.finish_reason, alignment=c.alignment,
                            logprobs=lp, token_ids=c.token_ids if token_ids else None)


def delta(d: generate.Delta, first: bool) -> CompletionChoice:
    # A piece's tokens: their base-model logprobs come with the choice's last piece (alignment).
    lp = None if d.logprobs is None else logprobs.completion(d.logprobs, aligned=False, offset=d.offset)
    return CompletionChoice(index=d.index, text=d.text, finish_reason=d.finish_reason, alignment=d.alignment,
                            logprobs=lp)


REPLY = Reply("cmpl", Completion, CompletionChunk, choice, delta)


# The route reads its body itself (read_json): FastAPI would parse it on the event loop.
@router.post("/v1/completions", response_model=Completion, openapi_extra=body_schema(CompletionRequest))
async def completions(request: Request, shared: Shared) -> Response:
    req = await read_json(request, CompletionRequest, shared.settings.max_request_bytes)
    check_request(shared, req)
    raw = req.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]

    def encode() -> list[list[int]]:
        for p in raw:
            if isinstance(p, str):
                fits(shared.engine, p)
        return [shared.engine.encode(p) for p in raw]

    prompts = await asyncio.to_thread(encode)
    echo = None
    if req.echo:
        echo = [p if isinstance(p, str) else shared.engine.tokenizer.decode(p) for p in raw]
    return await serve(request, shared, req, prompts, req.max_tokens, REPLY, echo)
