"""The `alignment` object of a request: which decoder, which guides with which weights.

One pydantic model serves the HTTP schema, the engine-side validation (`validate_params`) and
the decoders, so the three can never disagree about what a request means.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Decoder = Literal["args", "best_of_n"]
IN_ENGINE: frozenset[str] = frozenset({"args"})


class AlignmentParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decoder: Decoder = Field(description="the guided decoding method")
    rewards: dict[str, float] = Field(
        default_factory=dict,
        validate_default=True,
        description="reward name -> weight; the total is the weighted sum",
    )
    top_k: int = Field(10, ge=1, le=100, description="args: candidates per step")
    n: int = Field(4, ge=1, le=64, description="best_of_n: samples drawn per returned choice")
    return_candidates: bool = Field(False, description="best_of_n: return every sample")
    reward_cache: bool = Field(
        True,
        description="false re-runs the reward models over the whole text for every candidate, "
        "as the papers' reference code does (for benchmarks; much slower)",
    )

    @field_validator("rewards")
    @classmethod
    def _weights(cls, rewards: dict[str, float]) -> dict[str, float]:
        if not rewards:
            raise ValueError("name at least one reward with its weight, e.g. {\"sentiment\": 1.0}")
        bad = [name for name, w in rewards.items() if not math.isfinite(w)]
        if bad:
            raise ValueError(f"weights must be finite numbers; not finite: {bad}")
        return rewards


def from_extra_args(extra_args: dict | None) -> AlignmentParams | None:
    """The alignment params a request carries into the engine, if any."""
    raw = (extra_args or {}).get("alignd")
    if raw is None:
        return None
    return AlignmentParams.model_validate(raw)
