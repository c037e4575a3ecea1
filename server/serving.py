"""The serving path both generation endpoints share: admission, the engine run, the answer whole
or streamed, a client that goes away, and each request's metrics.

A client that disconnects is noticed while its request waits for admission and while it runs:
its work is cancelled, which aborts its engine requests, and it counts as a 499. A stream that
fails after its 200 was sent ends with an error event and `[DONE]`. A request still running at
the shutdown deadline is aborted the same way and answered 503 (a stream: its error event).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from vllm.exceptions import VLLMClientError
from vllm.v1.engine.exceptions import EngineDeadError

from alignd.server import generate, metrics
from alignd.server.admission import Admission, ShuttingDown
from alignd.server.config import ServeSettings
from alignd.server.engine import Engine
from alignd.server.errors import HTTPError, error_json
from alignd.server.schemas import (
    ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, SamplingFields, StreamOptions, Usage,
)

log = logging.getLogger("alignd.server")


@dataclass
class Served:
    """What every route shares; one per application, kept in `app.state.served`."""

    settings: ServeSettings
    engine: Engine
    admission: Admission


def served(request: Request) -> Served:
    return request.app.state.served


Shared = Annotated[Served, Depends(served)]


@dataclass(frozen=True)
class Reply:
    """What one generation endpoint answers with. The serving path builds the envelopes; the
    endpoint says how a finished choice (with its token ids or not) and a streamed piece (its
    choice's first or not) look in them."""

    prefix: str  # of the response id, as OpenAI's: "cmpl", "chatcmpl"
    whole: type[Completion] | type[ChatCompletion]
    chunk: type[CompletionChunk] | type[ChatCompletionChunk]
    choice: Callable[[generate.Choice, bool], BaseModel]
    delta: Callable[[generate.Delta, bool], BaseModel]


class Answer:
    """One request's response objects: every chunk of a stream has the same id and `created`."""

    def __init__(self, reply: Reply, plan: generate.Plan, model: str, admission: Admission) -> None:
        self.reply, self.plan, self.admission = reply, plan, admission
        self.head = {"id": plan.request_id, "created": int(time.time()), "model": model}

    def usage(self) -> Usage:
        prompt, completion = self.plan.usage["prompt_tokens"], self.plan.usage["completion_tokens"]
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def whole(self, choices: list[generate.Choice]) -> dict[str, Any]:
        ids = self.plan.req.return_token_ids
        body = self.reply.whole(**self.head, choices=[self.reply.choice(c, ids) for c in choices], usage=self.usage())
        return body.model_dump()

    async def chunks(self, options: StreamOptions | None) -> AsyncIterator[dict[str, Any]]:
        # OpenAI's chunks carry "usage": null only when the client asked for the usage chunk;
        # vLLM's continuous_usage_stats puts the usage so far in every chunk.
        include_usage = options is not None and options.include_usage
        continuous = options is not None and options.continuous_usage_stats
        leave_out = None if include_usage or continuous else {"usage"}
        started: set[int] = set()
        async for d in generate.stream(self.plan, self.admission.stopped):
            first = d.index not in started
            started.add(d.index)
            chunk = self.reply.chunk(**self.head, choices=[self.reply.delta(d, first)],
                                     usage=self.usage() if continuous else None)
            yield chunk.model_dump(exclude=leave_out)
        if include_usage:
            yield self.reply.chunk(**self.head, choices=[], usage=self.usage()).model_dump()


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def serve(request: Request, shared: Served, req: SamplingFields, prompts: list[list[int]],
                max_tokens: int | None, reply: Reply, echo: list[str] | None = None) -> Response:
    """Plan the request, admit it, run it and answer it, whole or streamed."""
    decoder = req.alignment.decoder if req.alignment else "none"
    request.state.decoder = decoder
    try:
        plan = generate.Plan(f"{reply.prefix}-{uuid.uuid4().hex}", prompts, req, max_tokens, shared.engine, echo)
        cost = plan.cost(shared.settings.max_guide_tokens_per_step)
        if plan.constraint is not None:
            await asyncio.to_thread(plan.check_constraint)
    except generate.BadRequest as e:
        raise HTTPError(400, str(e), e.param) from None
    admission = shared.admission
    admission.check(cost)
    try:
        await until_disconnected(request, admission.enter(cost))
    except ClientGone:
        return gone(request)
    answer = Answer(reply, plan, shared.settings.model_name, admission)
    started = time.perf_counter()
    metrics.IN_FLIGHT.inc()

    def finish(outcome: str) -> None:
        admission.leave(cost)
        metrics.IN_FLIGHT.dec()
        metrics.TOKENS.labels(decoder).inc(plan.usage["generated_tokens"])
        metrics.LATENCY.labels(decoder).observe(time.perf_counter() - started)
        request.state.outcome = outcome

    if req.stream:
        events = sse(answer.chunks(req.stream_options), finish, shared.settings.stream_keepalive)
        return StreamingResponse(events, media_type="text/event-stream")
    outcome = "500"
    try:
        choices = await until_disconnected(request, generate.run(plan), admission.stopped)
        outcome = "200"
        return JSONResponse(answer.whole(choices))
    except ClientGone:
        outcome = "499"
        return gone(request)
    except ShuttingDown as e:
        outcome = "503"
        raise HTTPError(503, str(e), headers={"Retry-After": "1", "Connection": "close"}) from None
    except Exception as e:
        status, message = failure(e)
        outcome = str(status)
        raise HTTPError(status, message, getattr(e, "param", None)) from None
    finally:
        finish(outcome)


def gone(request: Request) -> Response:
    request.state.outcome = "499"
    return Response(status_code=499)


def failure(e: Exception) -> tuple[int, str]:
    """The status and message for an exception that ends a request after it was admitted."""
    if isinstance(e, (generate.BadRequest, VLLMClientError)):
        return 400, str(e)
    if isinstance(e, ShuttingDown):
        return 503, str(e)
    if isinstance(e, EngineDeadError):
        return 503, "the engine stopped; the server is restarting"
    if isinstance(e, TimeoutError):
        return 503, f"the engine did not answer in time ({e})"
    if isinstance(e, HTTPError):
        return e.status, e.message
    log.error("alignd: request failed", exc_info=e)
    return 500, f"internal error ({type(e).__name__}); the server goes on"


async def until_disconnected(request: Request, work: Awaitable[Any],
                             interrupt: Callable[[], Awaitable[BaseException]] | None = None) -> Any:
    """Run `work`; if the client goes away first, cancel it (which aborts its engine requests)
    and raise ClientGone; if `interrupt()` returns first, cancel it and raise what it returned."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(interrupt()) if interrupt is not None else None

    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher} | ({stopper} if stopper else set()), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        interrupted = stopper is not None and stopper.done() and not stopper.cancelled()
        if stopper is not None:
            stopper.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if interrupted:
                raise stopper.result()
            raise ClientGone()
    return task.result()


async def sse(events: AsyncGenerator[dict[str, Any]], finish: Callable[[str], None],
              keepalive: float) -> AsyncIterator[str]:
    """Server-sent events; a stream that fails midway ends with an error event and [DONE]. A
    stream silent for `keepalive` seconds gets an SSE comment, which clients ignore and proxies
    count as traffic."""
    outcome = "200"
    pending: asyncio.Future | None = None
    try:
        while True:
            pending = pending or asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=keepalive)
            if not done:
                yield ": keep-alive\n\n"
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                break
            pending = None
            yield f"data: {json.dumps(event, allow_nan=False)}\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        outcome = "499"
        raise
    except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in the stream
        status, message = failure(e)
        outcome = str(status)
        yield f"data: {json.dumps(error_json(status, message, getattr(e, 'param', None)))}\n\n"
    finally:
        try:
            if pending is not None and not pending.done():
                pending.cancel()  # the client went away while the next event was being made
                await asyncio.gather(pending, return_exceptions=True)
            await events.aclose()  # its requests are aborted now, not when it is collected
        finally:
            finish(outcome)  # whatever the clean-up met (a second cancellation): the admission is released
    yield "data: [DONE]\n\n"
