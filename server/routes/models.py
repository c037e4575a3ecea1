"""`/v1/models`: the one served model, with what its `alignment` requests may name."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from alignd.decoders.table import DECODERS
from alignd.server.checks import authorized, missing
from alignd.server.config import ServeSettings
from alignd.server.schemas import ModelAlignment, ModelCard, ModelList
from alignd.server.serving import Shared

router = APIRouter(dependencies=[Depends(authorized)])


def decoders(settings: ServeSettings) -> list[str]:
    """The decoders this server has every model for (decoders/table.py)."""
    return [name for name, decoder in DECODERS.items() if missing(settings, decoder) is None]


@router.get("/v1/models")
async def models(shared: Shared) -> ModelList:
    settings = shared.settings
    card = ModelCard(
        id=settings.model_name,
        created=int(time.time()),
        max_model_len=shared.engine.max_model_len,
        alignment=ModelAlignment(decoders=decoders(settings), rewards=sorted(settings.rewards),
                                 values=sorted(settings.values)),
    )
    return ModelList(data=[card])
