"""`/v1/chat/completions`: messages through the model's chat template."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from alignd.server import generate, logprobs
from alignd.server.checks import authorized, body_schema, check_request, fits, read_json
from alignd.server.errors import HTTPError
from alignd.server.schemas import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta, ChatRequest,
)
from alignd.server.serving import Reply, Shared, serve

router = APIRouter(dependencies=[Depends(authorized)])


def choice(c: generate.Choice, token_ids: bool) -> ChatChoice:
    lp = None if c.logprobs is None else logprobs.chat(c.logprobs, aligned=c.alignment is not None)
    return ChatChoice(index=c.index, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                      alignment=c.alignment, logprobs=lp, token_ids=c.token_ids if token_ids else None)


def delta(d: generate.Delta, first: bool) -> ChatChunkChoice:
    # A piece's tokens: their base-model logprobs come with the choice's last piece (alignment).
    lp = None if d.logprobs is None else logprobs.chat(d.logprobs, aligned=False)
    return ChatChunkChoice(index=d.index, delta=ChatDelta(content=d.text, role="assistant" if first else None),
                           finish_reason=d.finish_reason, alignment=d.alignment, logprobs=lp)


REPLY = Reply("chatcmpl", ChatCompletion, ChatCompletionChunk, choice, delta)


# The route reads its body itself (read_json): FastAPI would parse it on the event loop.
@router.post("/v1/chat/completions", response_model=ChatCompletion, openapi_extra=body_schema(ChatRequest))
async def chat(request: Request, shared: Shared) -> Response:
    req = await read_json(request, ChatRequest, shared.settings.max_request_bytes)
    check_request(shared, req)
    messages = [m.template_dict() for m in req.messages]
    fits(shared.engine, "".join(m["content"] for m in messages))
    try:
        prompt = await asyncio.to_thread(shared.engine.encode_chat, messages, req.chat_template_kwargs)
    except ValueError as e:
        raise HTTPError(400, str(e), "messages") from None
    return await serve(request, shared, req, [prompt], req.max_completion_tokens or req.max_tokens, REPLY)
