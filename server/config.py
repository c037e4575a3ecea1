"""Server settings, from four layers: command-line flags > `ALIGND_*` environment variables >
the YAML file > defaults. Every setting can be given each way (`rewards` and `values` as JSON in
the environment: `ALIGND_REWARDS='{"a": "py:m:f"}'`); the dicts merge by name across layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError,
)

from alignd.rewards.specs import GuideSettings


class ServeSettings(BaseSettings, GuideSettings):
    """Everything `alignd serve` takes; the guide models and their limits are GuideSettings'
    fields (rewards/specs.py), shared with the worker's GuideConfig."""

    model_config = SettingsConfigDict(env_prefix="ALIGND_", extra="forbid")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   **others: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        # The values given, nothing else: load_settings layers the environment itself (under the
        # flags, over the YAML file), which pydantic-settings' own order (init > env) cannot do.
        return (init_settings,)

    model: str = Field(description="base model: local folder or hub id")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # SecretStr: the key prints as '**********' wherever settings are shown or logged.
    api_key: SecretStr | None = Field(None, description="every /v1 route needs 'Authorization: Bearer KEY'")
    api_key_file: Path | None = Field(
        None, description="read the API key from this file (a mounted secret; kept out of the process list)")
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
    stream_keepalive: float = Field(
        15.0, gt=0, description="seconds a stream may be silent before an SSE comment keeps proxies from "
        "cutting it (a best-of-n stream sends nothing until its samples are ranked)")
    exit_on_engine_death: bool = Field(True, description="exit non-zero when the engine dies, for a supervisor to restart")
    gpu_memory_utilization: float = Field(
        0.7, gt=0.0, le=1.0, description="share of each GPU vLLM takes for weights and KV cache (leave room "
        "for the guide models' caches)")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs the base model is split over (each holds "
                                      "its own copy of the guide models)")
    pipeline_parallel_size: int = Field(1, ge=1, description="pipeline stages of the base model")
    seed: int = Field(0, description="the engine's seed")
    allow_reward_recompute: bool = Field(
        False,
        description="accept alignment.reward_cache=false: every candidate re-run over the whole "
        "text, whose steps can take minutes and stall every request (benchmarks only)",
    )

    @model_validator(mode="after")
    def _key_from_file(self) -> ServeSettings:
        if self.api_key_file is None:
            return self
        if self.api_key is not None:
            raise ValueError("api_key and api_key_file both given: give the key one way")
        try:
            key = self.api_key_file.read_text().strip()
        except OSError as e:
            raise ValueError(f"api_key_file: cannot read {self.api_key_file} ({e.strerror})") from None
        if not key:
            raise ValueError(f"api_key_file: {self.api_key_file} is empty")
        self.api_key = SecretStr(key)
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


# One setting given two ways: a layer that sets either replaces both from the layers under it.
KEY_PAIR = ("api_key", "api_key_file")


def load_settings(config_file: Path | None, flags: dict[str, Any]) -> ServeSettings:
    """The settings from the YAML file, then the `ALIGND_*` environment variables, then the flags
    that were given (None: not given), each over the last."""
    layers = [_yaml_layer(config_file), _env_layer(), {k: v for k, v in flags.items() if v is not None}]
    data: dict[str, Any] = {}
    for layer in layers:
        if any(k in layer for k in KEY_PAIR):
            for k in KEY_PAIR:
                data.pop(k, None)
        for key, value in layer.items():
            if key in ("rewards", "values") and isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
    return ServeSettings(**data)


def _yaml_layer(config_file: Path | None) -> dict[str, Any]:
    if config_file is None:
        return {}
    loaded = yaml.safe_load(config_file.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{config_file}: expected a mapping of settings")
    return loaded


def _env_layer() -> dict[str, Any]:
    # pydantic-settings' own reading: the prefix, any case, JSON for the dict settings.
    try:
        return EnvSettingsSource(ServeSettings)()
    except SettingsError as e:
        raise ValueError(f"{e} (ALIGND_REWARDS and ALIGND_VALUES are JSON objects: '{{\"NAME\": \"SPEC\"}}')") from None
