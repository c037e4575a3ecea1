"""The FastAPI application: OpenAI-compatible routes, errors, auth, limits, metrics."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from vllm.v1.engine.exceptions import EngineDeadError

from alignd.decoders.params import AlignmentParams
from alignd.server import generate, metrics
from alignd.server.config import ServeSettings
from alignd.server.engine import Engine
from alignd.server.schemas import ChatRequest, CompletionRequest, SamplingFields, Usage, error_json


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_json(status, message, param), status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    where = ".".join(loc)
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{where}: {msg}" if where else msg), where or None


def create_app(settings: ServeSettings, engine: Engine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine.llm is None:
            engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="alignd", version="0.1.0", lifespan=lifespan)
    in_flight = {"n": 0}

    # -- errors -------------------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error(400, message, param)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
        return error(exc.status, exc.message, exc.param)

    @app.middleware("http")
    async def _limits(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > settings.max_request_bytes:
            return error(413, f"request body over {settings.max_request_bytes} bytes")
        return await call_next(request)

    # -- dependencies -------------------------------------------------------------------------
    async def authorized(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), settings.api_key):
            raise HTTPError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

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
            return error(503, "the engine is not running")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        if engine.alive:
            metrics.observe_worker(await engine.stats())
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

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(req: CompletionRequest, request: Request) -> Response:
        check_request(req)
        raw = req.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]
        prompts = [engine.encode(p) for p in raw]
        return await serve("completions", request, req, prompts, req.max_tokens, completion_body)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(req: ChatRequest, request: Request) -> Response:
        check_request(req)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = engine.encode_chat(messages)
        except ValueError as e:
            raise HTTPError(400, str(e), "messages") from None
        return await serve("chat", request, req, [prompt], req.max_completion_tokens or req.max_tokens, chat_body)

    # -- shared serving path ------------------------------------------------------------------
    async def serve(endpoint, request, req, prompts, max_tokens, body) -> Response:
        decoder = req.alignment.decoder if req.alignment else "none"
        if in_flight["n"] >= settings.max_concurrent_requests:
            metrics.REQUESTS.labels(endpoint, decoder, "429").inc()
            raise HTTPError(429, f"server busy: {in_flight['n']} requests in flight; retry later")
        prefix = "chatcmpl" if endpoint == "chat" else "cmpl"
        try:
            plan = generate.Plan(f"{prefix}-{uuid.uuid4().hex}", prompts, req, max_tokens, engine)
        except generate.BadRequest as e:
            raise HTTPError(400, str(e), e.param) from None
        render = Renderer(plan, settings.model_name, body)
        started = time.perf_counter()

        def done(status: str) -> None:
            in_flight["n"] -= 1
            metrics.IN_FLIGHT.dec()
            metrics.REQUESTS.labels(endpoint, decoder, status).inc()
            metrics.TOKENS.labels(decoder).inc(plan.usage["completion_tokens"])
            metrics.LATENCY.labels(decoder).observe(time.perf_counter() - started)

        in_flight["n"] += 1
        metrics.IN_FLIGHT.inc()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                sse(render.stream(include_usage), done), media_type="text/event-stream"
            )
        status = "200"
        try:
            choices = await until_disconnected(request, generate.run(plan))
            return JSONResponse(render.whole(choices))
        except asyncio.CancelledError:
            status = "499"
            raise
        except EngineDeadError:
            status = "503"
            raise HTTPError(503, "the engine stopped; restart the server") from None
        finally:
            done(status)

    return app


async def until_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Run `work`; if the client goes away first, cancel it (which aborts its engine requests)."""
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
        raise asyncio.CancelledError("client disconnected")
    return task.result()


async def sse(events: AsyncIterator[dict], done: Callable[[str], None]) -> AsyncIterator[str]:
    status = "200"
    try:
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        status = "499"
        raise
    except EngineDeadError:
        status = "503"
        yield f"data: {json.dumps(error_json(503, 'the engine stopped; restart the server'))}\n\n"
    finally:
        done(status)


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
        out["alignment"] = c.alignment.model_dump(exclude_none=True)
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
