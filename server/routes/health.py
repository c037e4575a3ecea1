"""Liveness and Prometheus metrics: no API key, so that probes and scrapers need none."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from alignd.server import metrics
from alignd.server.errors import HTTPError
from alignd.server.schemas import Health
from alignd.server.serving import Shared

router = APIRouter()


@router.get("/health")
async def health(shared: Shared) -> Health:
    if not shared.engine.alive:
        raise HTTPError(503, "the engine is not running")
    return Health()


@router.get("/metrics")
async def prometheus(shared: Shared) -> Response:
    stats = await shared.engine.stats() if shared.engine.alive else None
    if stats is not None:
        metrics.observe_worker(stats)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
