"""vLLM's `/tokenize` and `/detokenize`: the served model's tokenizer, as the generation routes
use it (so a client can count a prompt's tokens against `max_model_len` before sending it)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request

from alignd.server.checks import authorized, body_schema, read_json
from alignd.server.errors import HTTPError
from alignd.server.service_schemas import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from alignd.server.serving import Served, Shared

router = APIRouter(dependencies=[Depends(authorized)])


def check_model(shared: Served, model: str | None) -> None:
    if model is not None and model != shared.settings.model_name:
        raise HTTPError(404, f"model {model!r} does not exist; this server serves {shared.settings.model_name!r}",
                        "model")


@router.post("/tokenize", response_model=TokenizeResponse, openapi_extra=body_schema(TokenizeRequest))
async def tokenize(request: Request, shared: Shared) -> TokenizeResponse:
    req = await read_json(request, TokenizeRequest, shared.settings.max_request_bytes)
    check_model(shared, req.model)
    engine = shared.engine

    def encode() -> list[int]:
        if req.prompt is not None:
            return engine.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]
        messages = [m.template_dict() for m in req.messages or ()]
        try:
            return engine.encode_chat(messages, req.chat_template_kwargs)
        except ValueError as e:
            raise HTTPError(400, str(e), "messages") from None

    tokens = await asyncio.to_thread(encode)
    strs = engine.tokenizer.convert_ids_to_tokens(tokens) if req.return_token_strs else None
    return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, openapi_extra=body_schema(DetokenizeRequest))
async def detokenize(request: Request, shared: Shared) -> DetokenizeResponse:
    req = await read_json(request, DetokenizeRequest, shared.settings.max_request_bytes)
    check_model(shared, req.model)
    engine = shared.engine
    bad = next((t for t in req.tokens if t >= engine.vocab_limit), None)
    if bad is not None:
        raise HTTPError(400, f"token id {bad} is not in the vocabulary (0 to {engine.vocab_limit - 1})", "tokens")
    return DetokenizeResponse(prompt=await asyncio.to_thread(engine.tokenizer.decode, req.tokens))
