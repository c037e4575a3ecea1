"""Everything one `alignd train-value` run takes, as one typed object.

The command line (train_value.parser) and `alignd models build` both make one; every stage reads
its fields. Bounds live here, so a bad value is one clear error before anything runs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alignd.rewards.specs import NAME


class TrainValueSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="the frozen base model (folder or hub id) to sample")
    rewards: dict[str, str] = Field(min_length=1, description="NAME -> SPEC, as in `alignd serve`")
    reward_weights: dict[str, float] = Field(default_factory=dict, description="NAME -> weight (default 1 each)")
    prompts: Path = Field(description="one prompt per line, or JSONL with a 'prompt' or 'messages' field")
    out: Path = Field(description="output folder (also the cache a rerun resumes from)")
    backbone: str | None = Field(None, description="initial weights of V (default: the base)")
    backbone_layers: int | None = Field(None, ge=1, description="keep only the backbone's first N decoder layers")
    samples_per_prompt: int = Field(4, ge=1)
    max_tokens: int = Field(128, ge=1, description="completion length limit when sampling")
    temperature: float = Field(1.0, ge=0)
    prompt_format: Literal["auto", "chat", "raw"] = "auto"
    sampler: Literal["auto", "hf", "vllm"] = "auto"
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    td_lambda: float = Field(0.95, ge=0, le=1)
    holdout: float = Field(0.2, gt=0, lt=1, description="fraction of prompts held out for evaluation")
    seed: int = 0
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="after")
    def _names(self) -> TrainValueSettings:
        bad = [n for n in self.rewards if not NAME.match(n)]
        if bad:
            raise ValueError(f"reward names must be letters, digits, '_', '.', '-': {bad}")
        unknown = [n for n in self.reward_weights if n not in self.rewards]
        if unknown:
            raise ValueError(f"a reward weight for {unknown[0]!r}, which is not a reward")
        if not all(math.isfinite(w) for w in self.reward_weights.values()):
            raise ValueError("reward weights must be finite")
        return self

    @property
    def weights(self) -> dict[str, float]:
        """The weight of every reward in the training reward."""
        return {name: self.reward_weights.get(name, 1.0) for name in self.rewards}
