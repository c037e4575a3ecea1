"""Liveness, readiness, the version and Prometheus metrics: no API key, so that probes and
scrapers need none.

`/health` is liveness: 200 while the process and its engine are alive, draining included (a
probe that failed during a drain would have the server killed mid-drain); 503 while the model
loads (a start-up probe covers that time) and once the engine is dead. `/ready` is readiness:
200 only while requests are admitted; 503 while the model loads, while draining, and when dead.
"""

from __future__ import annotations

import importlib.metadata

import vllm
from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from alignd.server import metrics
from alignd.server.admission import Phase
from alignd.server.errors import HTTPError
from alignd.server.service_schemas import Health, Version
from alignd.server.serving import Shared

router = APIRouter()


@router.get("/health")
async def health(shared: Shared) -> Health:
    phase = shared.admission.phase
    if phase is Phase.loading or phase is Phase.dead:
        raise shared.admission.refusal()
    if not shared.engine.alive:
        raise HTTPError(503, "the engine is not running")
    return Health(status="draining" if phase is Phase.draining else "ok")


@router.get("/ready")
async def ready(shared: Shared) -> Health:
    refusal = shared.admission.refusal()
    if refusal is not None:
        raise refusal
    if not shared.engine.alive:
        raise HTTPError(503, "the engine is not running")
    return Health()


@router.get("/version")
async def version() -> Version:
    return Version(version=importlib.metadata.version("alignd"), vllm=vllm.__version__)


@router.get("/metrics")
async def prometheus(shared: Shared) -> Response:
    stats = await shared.engine.stats() if shared.engine.alive else None
    if stats is not None:
        metrics.observe_worker(stats)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
