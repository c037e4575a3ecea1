"""The `alignment` object of a request: which decoder, which guides with which weights.

One pydantic model serves the HTTP schema, the engine-side validation (`validate_params`) and
the decoders, so the three can never disagree about what a request means. It reaches the engine
in SamplingParams.extra_args, written by `to_extra_args` and read by `from_extra_args` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from alignd.decoders.table import DECODERS, Decoder

DecoderName = Literal[tuple(DECODERS)]  # type: ignore[valid-type]  # the table's names, in its order

# How to ask for each guide a decoder needs from the request (decoders.table.Need).
ASK = {
    "rewards": 'at least one reward with its weight, e.g. "rewards": {"sentiment": 1.0}',
    "values": 'at least one value model with its beta, e.g. "values": {"sentiment": 2.0}',
}


# Weights, betas and lambda stay within ±MAX_WEIGHT: with guide scores of any sane size the
# float32 sums of a step stay finite (a row whose sums do not is failed, not sampled from NaN).
MAX_WEIGHT = 1e6


def _bounded(weights: dict[str, float], what: str) -> dict[str, float]:
    bad = [name for name, w in weights.items() if not (math.isfinite(w) and abs(w) <= MAX_WEIGHT)]
    if bad:
        raise ValueError(f"{what} must be finite numbers within ±{MAX_WEIGHT:g}; not: {bad}")
    return weights


class Prune(BaseModel):
    """best_of_n's Speculative Rejection (Sun et al., 2024): stop the worst samples early."""

    model_config = ConfigDict(extra="forbid")

    every: int = Field(ge=1, le=4096, description="a checkpoint after every this many generated tokens")
    keep: float = Field(gt=0.0, le=1.0, description="the fraction of a choice's live samples kept at each "
                        "checkpoint (rounded up, at least one); the others are stopped")

    def kept(self, live: int) -> int:
        return max(1, math.ceil(round(self.keep * live, 9)))


class AlignmentParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    decoder: DecoderName = Field(description="the guided decoding method")
    rewards: dict[str, float] = Field(
        default_factory=dict, description="reward name -> weight; the total is the weighted sum"
    )
    values: dict[str, float] = Field(default_factory=dict, description="vas: value model name -> beta")
    top_k: int = Field(10, ge=1, le=100, description="args, transfer_q, vas: candidates per step")
    rollout_tokens: int = Field(20, ge=1, le=256, description="transfer_q: baseline rollout length")
    lambda_: float = Field(
        1.0, alias="lambda", description="dera: 0 = reference model, 1 = served model, > 1 extrapolates"
    )
    n: int = Field(4, ge=1, le=64, description="best_of_n: samples drawn per returned choice; blockwise: "
                   "blocks drawn per round")
    block_tokens: int = Field(16, ge=1, le=256, description="blockwise: tokens per block")
    return_candidates: bool = Field(False, description="best_of_n: return every sample")
    prune: Prune | None = Field(None, description="best_of_n: score the live samples' text so far at "
                                "checkpoints and stop the lowest-scoring (Speculative Rejection)")
    reward_cache: bool = Field(
        True,
        description="false re-runs the reward models over the whole text for every candidate, "
        "as the papers' reference code does (for benchmarks; much slower)",
    )

    @field_validator("rewards")
    @classmethod
    def _rewards(cls, rewards: dict[str, float]) -> dict[str, float]:
        return _bounded(rewards, "reward weights")

    @field_validator("values")
    @classmethod
    def _values(cls, values: dict[str, float]) -> dict[str, float]:
        return _bounded(values, "value betas")

    @field_validator("lambda_")
    @classmethod
    def _lambda(cls, lam: float) -> float:
        return _bounded({"lambda": lam}, "lambda")["lambda"]

    @model_validator(mode="after")
    def _needs(self) -> AlignmentParams:
        for need in sorted(self.method.needs & ASK.keys()):
            if not getattr(self, need):
                raise ValueError(f"{self.decoder} needs {ASK[need]}")
        unused = sorted(self.given() - {"decoder", *self.method.params})
        if unused:
            raise ValueError(f"{self.decoder} does not use {unused[0]!r} (it reads: {', '.join(self.method.params)})")
        return self

    def given(self) -> set[str]:
        """The fields the request set, by their JSON names."""
        return {type(self).model_fields[name].alias or name for name in self.model_fields_set}

    @property
    def method(self) -> Decoder:
        return DECODERS[self.decoder]

    @property
    def in_engine(self) -> bool:
        """Whether the engine's steps run it: the per-token decoders, and best-of-n when it
        prunes (its samples' rewards then advance token by token)."""
        return self.method.step is not None and (self.method.rank is None or self.prune is not None)

    @property
    def branches(self) -> int:
        """Branches each scorer reads per row and step: the top-k candidates, or the one token
        just sampled for a decoder that ranks whole samples."""
        return 1 if self.method.rank is not None else self.top_k


@dataclass(frozen=True)
class EngineRequest:
    """What a guided request carries into the engine."""

    alignment: AlignmentParams
    request_id: str  # the HTTP request's: the worker keeps its notes for the response under it
    sample: str = ""  # best_of_n with prune: the sample's own name, its checkpoint rewards' key


def to_extra_args(alignment: AlignmentParams, request_id: str, sample: str = "") -> dict:
    """The JSON-safe SamplingParams.extra_args of a request the engine guides."""
    return {"alignd": {"alignment": alignment.model_dump(by_alias=True, exclude_unset=True), "request_id": request_id,
                       **({"sample": sample} if sample else {})}}


def from_extra_args(extra_args: dict | None) -> EngineRequest | None:
    """What `to_extra_args` wrote, validated again (the engine may be reached without the
    server's checks); None for a request the engine does not guide."""
    raw = (extra_args or {}).get("alignd")
    if raw is None:
        return None
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k, ""), str) for k in ("request_id", "sample")):
        raise ValueError("extra_args.alignd: expected {\"alignment\": {...}, \"request_id\": str, \"sample\": str}")
    alignment = AlignmentParams.model_validate(raw.get("alignment"))
    if not alignment.in_engine:
        raise ValueError(f"decoder {alignment.decoder!r} does not run inside the engine"
                         + (" without prune" if alignment.method.step is not None else ""))
    return EngineRequest(alignment, raw.get("request_id", ""), raw.get("sample", ""))
