"""The FastAPI application: OpenAI-compatible routes (server/routes/), auth and input checks
(checks.py), one serving path for both generation endpoints (serving.py), errors in OpenAI's
shape (errors.py), and the engine's life: it loads behind an open socket (so that `/health` and
`/ready` answer while it does), and its death fails every request and ends the server.

Nothing slow runs on the event loop: request bodies are read with a byte limit as they arrive
and parsed in a thread, prompts are tokenized in a thread, and calls into the engine worker have
time limits. So one large or hostile request never makes `/health` or other streams wait.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from alignd.server.admission import Admission
from alignd.server.config import ServeSettings
from alignd.server.engine import Engine
from alignd.server.errors import install
from alignd.server.routes import ROUTERS
from alignd.server.schemas import ChatRequest, CompletionRequest
from alignd.server.service_schemas import DetokenizeRequest, RewardsRequest, TokenizeRequest
from alignd.server.serving import Served

log = logging.getLogger("alignd.server")


def create_app(settings: ServeSettings, engine: Engine) -> FastAPI:
    app = FastAPI(title="alignd", version="0.1.0", lifespan=lifespan)
    app.state.served = Served(settings, engine, Admission(settings))
    app.state.exit = None  # set by whoever runs the server: exit(code) ends it
    install(app, settings.max_request_bytes)
    for router in ROUTERS:
        app.include_router(router)
    app.openapi = lambda: openapi(app, [CompletionRequest, ChatRequest, RewardsRequest, TokenizeRequest, DetokenizeRequest])
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine = app.state.served.engine
    # uvicorn binds its socket only once the start-up below returns: the engine loads after.
    loading = asyncio.ensure_future(asyncio.to_thread(engine.start) if engine.llm is None else asyncio.sleep(0))
    life = asyncio.create_task(run_engine(app, loading))
    yield
    life.cancel()
    if not loading.done():
        log.info("alignd: waiting for the engine to finish loading, to stop it")
    # A load in its thread cannot be interrupted: wait for it, so that the engine it made is stopped.
    await asyncio.gather(life, loading, return_exceptions=True)
    engine.shutdown()


async def run_engine(app: FastAPI, loading: asyncio.Future) -> None:
    """Load the engine, admit requests once it is ready, and watch it until it dies."""
    served: Served = app.state.served
    engine = served.engine
    try:
        await asyncio.shield(loading)
        await engine.attach_guides()
    except Exception as e:  # noqa: BLE001 - vLLM's start-up errors vary; each ends the server the same way
        log.error("alignd: the engine failed to start: %s: %s", type(e).__name__, e, exc_info=e)
        served.admission.close(f"the engine failed to start ({type(e).__name__})")
        stop_server(app, 1)
        return
    served.admission.ready()
    s = served.settings
    print(f"alignd: ready: {s.model_name} at http://{s.host}:{s.port}/v1", flush=True)
    await engine.watch(lambda: engine_died(app))


def engine_died(app: FastAPI) -> None:
    log.error("alignd: the engine died; failing every request in flight")
    served: Served = app.state.served
    served.admission.close("the engine stopped; the server is restarting")
    if served.settings.exit_on_engine_death:
        stop_server(app, 1)


def stop_server(app: FastAPI, code: int) -> None:
    if app.state.exit is not None:
        app.state.exit(code)


def openapi(app: FastAPI, bodies: list[type[BaseModel]]) -> dict[str, Any]:
    """FastAPI's schema plus the request bodies the routes read themselves (see checks.read_json)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in bodies:
            own = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(own.pop("$defs", {}))
            components[model.__name__] = own
        app.openapi_schema = schema
    return app.openapi_schema
