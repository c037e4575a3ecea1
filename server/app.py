"""The FastAPI application: OpenAI-compatible routes, auth, admission, streaming, liveness.

Nothing slow runs on the event loop: request bodies are read with a byte limit as they arrive
and parsed in a thread, prompts are tokenized in a thread, and calls into the engine worker have
time limits. So one large or hostile request never makes `/health` or other streams wait.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from vllm.exceptions import VLLMClientError
from vllm.v1.engine.exceptions import EngineDeadError

from alignd.decoders.params import AlignmentParams
from alignd.server import generate, metrics
from alignd.server.admission import Admission
from alignd.server.config import ServeSettings
from alignd.server.engine import Engine
from alignd.server.errors import HTTPError, error_json, install, validation_message
from alignd.server.schemas import ChatRequest, CompletionRequest, SamplingFields, Usage

log = logging.getLogger("alignd.server")

Body = TypeVar("Body", bound=BaseModel)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def create_app(settings: ServeSettings, engine: Engine) -> FastAPI:
    admission = Admission(settings)

    def engine_died() -> None:
        log.error("alignd: the engine died; failing every request in flight")
        admission.close("the engine stopped; the server is restarting")
        if settings.exit_on_engine_death and app.state.exit is not None:
            app.state.exit(1)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine.llm is None:
            engine.start()
        await engine.attach_guides()
        watcher = asyncio.create_task(engine.watch(engine_died))
        yield
        watcher.cancel()
        engine.shutdown()

    app = FastAPI(title="alignd", version="0.1.0", lifespan=lifespan)
    app.state.exit = None  # set by whoever runs the server: exit(code) ends it
    install(app, settings.max_request_bytes)

    # -- input --------------------------------------------------------------------------------
    async def authorized(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Bytes, not str: compare_digest refuses non-ASCII text (headers arrive as latin-1).
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode("latin-1", "replace"), settings.api_key.encode()
        ):
            raise HTTPError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    async def parse(request: Request, model: type[Body]) -> Body:
        body, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: chunked bodies too
            size += len(chunk)
            if size > settings.max_request_bytes:
                raise HTTPError(413, f"request body over {settings.max_request_bytes} bytes")
            body.append(chunk)
        try:
            return await asyncio.to_thread(model.model_validate_json, b"".join(body))
        except ValidationError as e:
            raise HTTPError(400, *validation_message(e.errors())) from None

    def fits(text: str) -> None:
        # Cheaper than tokenizing: a text longer than this cannot fit in the context at all.
        most = 2 * engine.max_model_len * engine.max_token_chars
        if len(text) > most:
            raise HTTPError(400, f"the prompt has {len(text):,} characters, more than the model's context of "
                                 f"{engine.max_model_len} tokens can hold", "prompt")

    def check_request(req: SamplingFields) -> None:
        if req.model != settings.model_name:
            raise HTTPError(404, f"model {req.model!r} does not exist; this server serves {settings.model_name!r}", "model")
        if req.alignment is not None:
            check_alignment(req.alignment)
        if not engine.alive:
            raise HTTPError(503, "the engine is not running")

    def check_alignment(al: AlignmentParams) -> None:
        for kind, asked, configured in (("reward", al.rewards, settings.rewards), ("value", al.values, settings.values)):
            unknown = [name for name in asked if name not in configured]
            if unknown:
                have = sorted(configured) or f"none (start the server with --{kind} NAME=SPEC)"
                raise HTTPError(400, f"unknown {kind} {unknown[0]!r}; configured {kind}s: {have}", f"alignment.{kind}s")
        if not al.reward_cache and not settings.allow_reward_recompute:
            raise HTTPError(400, "reward_cache=false (recompute every candidate from the whole text) is off on "
                            "this server: its steps can stall every request; start it with "
                            "--allow-reward-recompute to benchmark it", "alignment.reward_cache")
        if al.decoder == "dera" and settings.reference is None:
            raise HTTPError(400, "dera needs a reference model: start the server with --reference PATH_OR_ID",
                            "alignment.decoder")

    # -- routes -------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if not engine.alive:
            raise HTTPError(503, "the engine is not running")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        stats = await engine.stats() if engine.alive else None
        if stats is not None:
            metrics.observe_worker(stats)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{
                "id": settings.model_name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "alignd",
                "max_model_len": engine.max_model_len,
                "alignment": {
                    "decoders": ["args", "transfer_q", "vas", "best_of_n"] + (["dera"] if settings.reference else []),
                    "rewards": sorted(settings.rewards),
                    "values": sorted(settings.values),
                },
            }],
        }

    @app.post("/v1/completions", dependencies=[Depends(authorized)], openapi_extra=_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        req = await parse(request, CompletionRequest)
        check_request(req)
        raw = req.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]

        def encode() -> list[list[int]]:
            for p in raw:
                if isinstance(p, str):
                    fits(p)
            return [engine.encode(p) for p in raw]

        prompts = await asyncio.to_thread(encode)
        return await serve("completions", request, req, prompts, req.max_tokens, completion_body)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)], openapi_extra=_body(ChatRequest))
    async def chat(request: Request) -> Response:
        req = await parse(request, ChatRequest)
        check_request(req)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        fits("".join(m["content"] for m in messages))
        try:
            prompt = await asyncio.to_thread(engine.encode_chat, messages)
        except ValueError as e:
            raise HTTPError(400, str(e), "messages") from None
        return await serve("chat", request, req, [prompt], req.max_completion_tokens or req.max_tokens, chat_body)

    # -- shared serving path ------------------------------------------------------------------
    async def serve(endpoint: str, request: Request, req: SamplingFields, prompts: list[list[int]],
                    max_tokens: int | None, body: Callable) -> Response:
        decoder = req.alignment.decoder if req.alignment else "none"
        request.state.decoder = decoder
        prefix = "chatcmpl" if endpoint == "chat" else "cmpl"
        try:
            plan = generate.Plan(f"{prefix}-{uuid.uuid4().hex}", prompts, req, max_tokens, engine)
            cost = plan.cost(settings.max_guide_tokens_per_step)
        except generate.BadRequest as e:
            raise HTTPError(400, str(e), e.param) from None
        admission.check(cost)
        try:
            await until_disconnected(request, admission.enter(cost))
        except ClientGone:
            return gone(request)
        render = Renderer(plan, settings.model_name, body)
        started = time.perf_counter()
        metrics.IN_FLIGHT.inc()

        def finish(outcome: str) -> None:
            admission.leave(cost)
            metrics.IN_FLIGHT.dec()
            metrics.TOKENS.labels(decoder).inc(plan.usage["completion_tokens"])
            metrics.LATENCY.labels(decoder).observe(time.perf_counter() - started)
            request.state.outcome = outcome

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(sse(render.stream(include_usage), finish), media_type="text/event-stream")
        outcome = "500"
        try:
            choices = await until_disconnected(request, generate.run(plan))
            outcome = "200"
            return JSONResponse(render.whole(choices))
        except ClientGone:
            outcome = "499"
            return gone(request)
        except Exception as e:
            status, message = failure(e)
            outcome = str(status)
            raise HTTPError(status, message, getattr(e, "param", None)) from None
        finally:
            finish(outcome)

    app.openapi = lambda: _openapi(app, [CompletionRequest, ChatRequest])
    return app


def gone(request: Request) -> Response:
    request.state.outcome = "499"
    return Response(status_code=499)


def failure(e: Exception) -> tuple[int, str]:
    """The status and message for an exception that ends a request after it was admitted."""
    if isinstance(e, (generate.BadRequest, VLLMClientError)):
        return 400, str(e)
    if isinstance(e, EngineDeadError):
        return 503, "the engine stopped; the server is restarting"
    if isinstance(e, TimeoutError):
        return 503, f"the engine did not answer in time ({e})"
    if isinstance(e, HTTPError):
        return e.status, e.message
    log.error("alignd: request failed", exc_info=e)
    return 500, f"internal error ({type(e).__name__}); the server goes on"


async def until_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Run `work`; if the client goes away first, cancel it (which aborts its engine requests)
    and raise ClientGone."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientGone()
    return task.result()


async def sse(events: AsyncIterator[dict], finish: Callable[[str], None]) -> AsyncIterator[str]:
    """Server-sent events; a stream that fails midway ends with an error event and [DONE]."""
    outcome = "200"
    try:
        async for event in events:
            yield f"data: {json.dumps(event, allow_nan=False)}\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        outcome = "499"
        raise
    except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in the stream
        status, message = failure(e)
        outcome = str(status)
        yield f"data: {json.dumps(error_json(status, message, getattr(e, 'param', None)))}\n\n"
    finally:
        finish(outcome)
    yield "data: [DONE]\n\n"


def _body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body the route reads itself (to parse it off the event loop)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _openapi(app: FastAPI, bodies: list[type[BaseModel]]) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in bodies:
            own = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(own.pop("$defs", {}))
            components[model.__name__] = own
        app.openapi_schema = schema
    return app.openapi_schema


class Renderer:
    """Turns choices and deltas into OpenAI response objects for one endpoint."""

    def __init__(self, plan: generate.Plan, model: str, body: Callable) -> None:
        self.plan, self.model, self.body = plan, model, body
        self.created = int(time.time())

    def _usage(self) -> dict[str, int]:
        u = self.plan.usage
        return Usage(
            prompt_tokens=u["prompt_tokens"],
            completion_tokens=u["completion_tokens"],
            total_tokens=u["prompt_tokens"] + u["completion_tokens"],
        ).model_dump()

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        kind = self.body(None, chunk)
        return {"id": self.plan.request_id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, choices: list[generate.Choice]) -> dict[str, Any]:
        return {
            **self._envelope(False),
            "choices": [self.body(c, False, token_ids=self.plan.req.return_token_ids) for c in choices],
            "usage": self._usage(),
        }

    async def stream(self, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        started: set[int] = set()
        async for d in generate.stream(self.plan):
            first = d.index not in started
            started.add(d.index)
            chunk = {**self._envelope(True), "choices": [self.body(d, True, first)]}
            if include_usage:
                chunk["usage"] = None
            yield chunk
        if include_usage:
            yield {**self._envelope(True), "choices": [], "usage": self._usage()}


def _extras(c, out: dict[str, Any], token_ids: bool) -> dict[str, Any]:
    if token_ids and isinstance(c, generate.Choice):
        out["token_ids"] = c.token_ids
    if c.alignment is not None:
        out["alignment"] = c.alignment.model_dump(exclude_none=True) | {"total": c.alignment.total}
    return out


def completion_body(c, chunk: bool, first: bool = False, token_ids: bool = False) -> Any:
    if c is None:
        return "text_completion"
    out = {"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
    return _extras(c, out, token_ids)


def chat_body(c, chunk: bool, first: bool = False, token_ids: bool = False) -> Any:
    if c is None:
        return "chat.completion.chunk" if chunk else "chat.completion"
    if chunk:
        delta: dict[str, Any] = {"content": c.text}
        if first:
            delta["role"] = "assistant"
        out = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": c.finish_reason}
    else:
        out = {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": None,
            "finish_reason": c.finish_reason,
        }
    return _extras(c, out, token_ids)
