"""The FastAPI application: OpenAI-compatible routes (server/routes/), auth and input checks
(checks.py), one serving path for both generation endpoints (serving.py), errors in OpenAI's
shape (errors.py), and the engine's life.

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
from alignd.server.serving import Served

log = logging.getLogger("alignd.server")


def create_app(settings: ServeSettings, engine: Engine) -> FastAPI:
    app = FastAPI(title="alignd", version="0.1.0", lifespan=lifespan)
    app.state.served = Served(settings, engine, Admission(settings))
    app.state.exit = None  # set by whoever runs the server: exit(code) ends it
    install(app, settings.max_request_bytes)
    for router in ROUTERS:
        app.include_router(router)
    app.openapi = lambda: openapi(app, [CompletionRequest, ChatRequest])
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine = app.state.served.engine
    if engine.llm is None:
        engine.start()
    await engine.attach_guides()
    watcher = asyncio.create_task(engine.watch(lambda: engine_died(app)))
    yield
    watcher.cancel()
    engine.shutdown()


def engine_died(app: FastAPI) -> None:
    log.error("alignd: the engine died; failing every request in flight")
    served: Served = app.state.served
    served.admission.close("the engine stopped; the server is restarting")
    if served.settings.exit_on_engine_death and app.state.exit is not None:
        app.state.exit(1)


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
