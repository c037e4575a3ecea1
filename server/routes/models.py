"""`/v1/models`: the one served model, with what its `alignment` requests may name."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from alignd.decoders.params import AlignmentParams
from alignd.decoders.table import DECODERS
from alignd.server.checks import authorized, missing
from alignd.server.config import ServeSettings
from alignd.server.engine import Engine
from alignd.server.service_schemas import DecoderCard, GuideCard, ModelAlignment, ModelCard, ModelList
from alignd.server.serving import Shared

router = APIRouter(dependencies=[Depends(authorized)])


def decoders(settings: ServeSettings) -> list[str]:
    """The decoders this server has every model for (decoders/table.py)."""
    return [name for name, decoder in DECODERS.items() if missing(settings, decoder) is None]


def guides(settings: ServeSettings, engine: Engine) -> list[GuideCard]:
    scorers = [GuideCard(name=name, kind=kind, spec=spec, route=getattr(engine.routes.get((kind, name)), "value", None))
               for kind, configured in (("reward", settings.rewards), ("value", settings.values))
               for name, spec in sorted(configured.items())]
    lms = [GuideCard(name=role, kind=role, spec=spec, route=None)
           for role, spec in (("reference", settings.reference), ("baseline", settings.baseline or settings.model))
           if spec is not None]
    return scorers + lms


def decoder_details(settings: ServeSettings) -> list[DecoderCard]:
    fields = AlignmentParams.model_json_schema()["properties"]
    return [DecoderCard(name=name, runs="request" if d.rank is not None else "engine", needs=sorted(d.needs),
                        parameters={p: fields[p] for p in d.params})
            for name, d in DECODERS.items() if missing(settings, d) is None]


@router.get("/v1/models")
async def models(shared: Shared) -> ModelList:
    settings = shared.settings
    card = ModelCard(
        id=settings.model_name,
        created=int(time.time()),
        max_model_len=shared.engine.max_model_len,
        alignment=ModelAlignment(decoders=decoders(settings), rewards=sorted(settings.rewards),
                                 values=sorted(settings.values), guides=guides(settings, shared.engine),
                                 decoder_details=decoder_details(settings)),
    )
    return ModelList(data=[card])
