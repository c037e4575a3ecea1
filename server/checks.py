"""What a request must pass before any work is planned for it: the API key, the body's size and
shape, the model, what its `alignment` asks of this server, and the prompt's length.

Nothing here blocks the event loop: the body is counted as it arrives and parsed in a thread,
so one large or hostile request never makes `/health` or other streams wait.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from alignd.decoders.params import AlignmentParams
from alignd.decoders.table import Decoder
from alignd.server.config import ServeSettings
from alignd.server.engine import Engine
from alignd.server.errors import HTTPError, validation_message
from alignd.server.schemas import SamplingFields
from alignd.server.serving import Served, served

Body = TypeVar("Body", bound=BaseModel)


async def authorized(request: Request) -> None:
    """A dependency of every route under /v1."""
    api_key = served(request).settings.api_key
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # Bytes, not str: compare_digest refuses non-ASCII text (headers arrive as latin-1).
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        token.strip().encode("latin-1", "replace"), api_key.get_secret_value().encode()
    ):
        raise HTTPError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")


async def read_json(request: Request, model: type[Body], max_bytes: int) -> Body:
    body, size = [], 0
    async for chunk in request.stream():  # counted as it arrives: chunked bodies too
        size += len(chunk)
        if size > max_bytes:
            raise HTTPError(413, f"request body over {max_bytes} bytes")
        body.append(chunk)
    try:
        return await asyncio.to_thread(model.model_validate_json, b"".join(body))
    except ValidationError as e:
        raise HTTPError(400, *validation_message(e.errors())) from None


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body the route reads itself with read_json (FastAPI cannot see it)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def check_request(shared: Served, req: SamplingFields) -> None:
    settings = shared.settings
    refusal = shared.admission.refusal()  # loading, draining or dead: before anything needs the engine
    if refusal is not None:
        raise refusal
    if req.model != settings.model_name:
        raise HTTPError(404, f"model {req.model!r} does not exist; this server serves {settings.model_name!r}", "model")
    if req.alignment is not None:
        check_alignment(settings, req.alignment)
    if not shared.engine.alive:
        raise HTTPError(503, "the engine is not running")


def check_alignment(settings: ServeSettings, al: AlignmentParams) -> None:
    """What an alignment request needs that only this server's configuration can tell."""
    for kind, asked, configured in (("reward", al.rewards, settings.rewards), ("value", al.values, settings.values)):
        unknown = [name for name in asked if name not in configured]
        if unknown:
            have = sorted(configured) or f"none (start the server with --{kind} NAME=SPEC)"
            raise HTTPError(400, f"unknown {kind} {unknown[0]!r}; configured {kind}s: {have}", f"alignment.{kind}s")
    if not al.reward_cache and not settings.allow_reward_recompute:
        raise HTTPError(400, "reward_cache=false (recompute every candidate from the whole text) is off on "
                        "this server: its steps can stall every request; start it with "
                        "--allow-reward-recompute to benchmark it", "alignment.reward_cache")
    why = missing(settings, al.method)
    if why is not None:
        raise HTTPError(400, f"{al.decoder} needs {why}", "alignment.decoder")


# What each need of a decoder (decoders/table.py) asks of the server's start-up configuration.
STARTED_WITH = {
    "rewards": ("a reward model", "--reward NAME=SPEC"),
    "values": ("a value model", "--value NAME=SPEC"),
    "reference": ("a reference model", "--reference PATH_OR_ID"),
}


def missing(settings: ServeSettings, decoder: Decoder) -> str | None:
    """What this server lacks to run `decoder`, or None when it has everything (the Transfer Q*
    baseline defaults to the served model)."""
    have = {"rewards": bool(settings.rewards), "values": bool(settings.values),
            "reference": settings.reference is not None}
    for need in sorted(decoder.needs & STARTED_WITH.keys()):
        if not have[need]:
            what, flag = STARTED_WITH[need]
            return f"{what}: start the server with {flag}"
    return None


def fits(engine: Engine, text: str) -> None:
    # Cheaper than tokenizing: a text longer than this cannot fit in the context at all.
    most = 2 * engine.max_model_len * engine.max_token_chars
    if len(text) > most:
        raise HTTPError(400, f"the prompt has {len(text):,} characters, more than the model's context of "
                             f"{engine.max_model_len} tokens can hold", "prompt")
