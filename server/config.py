"""Server settings: environment (ALIGND_*) < YAML file < command-line flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from alignd.rewards.specs import GuideSettings


class ServeSettings(BaseSettings, GuideSettings):
    """Everything `alignd serve` takes; the guide models and their limits are GuideSettings'
    fields (rewards/specs.py), shared with the worker's GuideConfig."""

    model_config = SettingsConfigDict(env_prefix="ALIGND_", extra="forbid")

    model: str = Field(description="base model: local folder or hub id")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = Field(None, ge=16)
    served_model_name: str | None = None
    max_num_seqs: int = Field(64, ge=1, description="rows the engine batches at once")
    max_concurrent_requests: int = Field(256, ge=1, description="requests in flight; beyond this, HTTP 429")
    max_concurrent_samples: int = Field(
        512, ge=1, description="sequences in flight (a request counts prompts x n x alignment.n); beyond this, HTTP 429"
    )
    max_samples_per_request: int = Field(64, ge=1, description="prompts x n x alignment.n of one request; beyond this, HTTP 400")
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="beyond this, HTTP 413")
    max_guide_tokens_per_step: int = Field(
        2048, ge=1, description="per sequence: guide tokens a decoder step may score "
        "(top_k, or top_k x (1 + rollout_tokens) for transfer_q); beyond this, HTTP 400"
    )
    queue_timeout: float = Field(60.0, gt=0, description="seconds a request may wait for room; then HTTP 429")
    max_guide_tokens_in_flight: int = Field(
        32768, ge=1, description="guide tokens per step of all guided requests running at once: beyond "
        "it requests wait for room (a request that alone exceeds it gets HTTP 400)"
    )
    rpc_timeout: float = Field(120.0, gt=0, description="seconds a call into the engine worker may take; then HTTP 503")
    shutdown_timeout: float = Field(30.0, ge=0, description="seconds SIGTERM waits for requests in flight")
    exit_on_engine_death: bool = Field(True, description="exit non-zero when the engine dies, for a supervisor to restart")
    gpu_memory_utilization: float = Field(0.7, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    seed: int = 0
    allow_reward_recompute: bool = Field(
        False,
        description="accept alignment.reward_cache=false: every candidate re-run over the whole "
        "text, whose steps can take minutes and stall every request (benchmarks only)",
    )

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


def load_settings(config_file: Path | None, overrides: dict[str, Any]) -> ServeSettings:
    """Merge the YAML file with flags that were given (None means not given)."""
    data: dict[str, Any] = {}
    if config_file is not None:
        loaded = yaml.safe_load(config_file.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: expected a mapping of settings")
        data.update(loaded)
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("rewards", "values"):
            data[key] = {**(data.get(key) or {}), **value}
        else:
            data[key] = value
    return ServeSettings(**data)
