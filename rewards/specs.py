"""What a guide is, from its `NAME=SPEC` flag to the path it takes at run time.

Shared by the front end (start-up checks, request validation) and the worker (loading), so both
sides classify every configured model the same way.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TEXT_PREFIX = "py:"


class GuideError(ValueError):
    """A configured guide model cannot be used; the message says which and why."""


class Route(str, Enum):
    cached = "cached"  # same tokenizer, supported architecture: per-request KV cache
    retokenized = "retokenized"  # other tokenizer: decode, re-encode, recompute (slower)
    uncached = "uncached"  # same tokenizer, architecture the cached path lacks: recompute
    text = "text"  # a Python function over texts


class GuideSettings(BaseModel):
    """The guide models and the limits on their work: server settings (ServeSettings has these
    fields) that travel into the worker as part of GuideConfig."""

    rewards: dict[str, str] = Field(default_factory=dict, description="NAME -> SPEC")
    values: dict[str, str] = Field(default_factory=dict, description="VAS value models, NAME -> SPEC")
    reference: str | None = Field(None, description="DeRa reference (SFT) model")
    baseline: str | None = Field(None, description="Transfer Q* rollout model (default: the served model)")
    text_reward_timeout: float = Field(
        2.0, gt=0, description="seconds a py: text reward may take for one sequence's texts; then it counts as failed"
    )
    guide_step_budget: int = Field(
        8192, ge=1, description="guide tokens per engine step, on average, of all guided sequences: "
        "beyond it they take turns (plain sequences never wait for them)"
    )
    guide_time_share: float = Field(
        1.0, ge=0, description="while plain sequences run, the guided work of a step may take this share of "
        "the step's time without it, on average (measured as the server runs); 0: the token budget alone"
    )

    @field_validator("rewards", "values")
    @classmethod
    def _names(cls, guides: dict[str, str]) -> dict[str, str]:
        bad = [n for n in guides if not NAME.match(n)]
        if bad:
            raise ValueError(f"names must be letters, digits, '_', '.', '-': {bad}")
        return guides


class GuideConfig(GuideSettings):
    """Everything the worker needs to build its guide runtime (travels in vLLM's additional_config)."""

    model: str  # the served model: its tokenizer, and the default Transfer Q* baseline
    routes: dict[str, Route] = Field(default_factory=dict)  # "kind/name" -> how it runs (for costs)

    def route_map(self) -> dict[tuple[str, str], Route]:
        return {tuple(key.split("/", 1)): route for key, route in self.routes.items()}


def parse_named(item: str, flag: str) -> tuple[str, str]:
    name, sep, spec = item.partition("=")
    if not sep or not spec:
        raise GuideError(f"{flag} {item!r}: expected NAME=SPEC (for example sentiment=/models/rm)")
    if not NAME.match(name):
        raise GuideError(f"{flag} {item!r}: a name is letters, digits, '_', '.', '-' (at most 64)")
    return name, spec


def load_text_reward(spec: str) -> Callable[[list[str]], list[float]]:
    target = spec[len(TEXT_PREFIX) :]
    module, sep, func = target.partition(":")
    if not sep or not module or not func:
        raise GuideError(f"{spec!r}: expected py:package.module:function")
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise GuideError(f"{spec!r}: cannot import: {e}") from e
    if not callable(fn):
        raise GuideError(f"{spec!r}: {func} is not callable")
    return fn


def same_vocab(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids


def _load_config_and_tokenizer(spec: str):
    from transformers import AutoConfig, AutoTokenizer

    local = Path(spec).expanduser()
    if not local.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise GuideError(f"{spec!r}: no such folder")
    try:
        cfg = AutoConfig.from_pretrained(spec)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for bad folders
        raise GuideError(f"{spec!r}: not a model folder or hub id ({type(e).__name__}: {e})") from e
    try:
        tok = AutoTokenizer.from_pretrained(spec)
    except Exception as e:
        raise GuideError(f"{spec!r}: cannot load its tokenizer ({type(e).__name__}: {e})") from e
    return cfg, tok


def _architecture(cfg) -> str:
    return (cfg.architectures or ["?"])[0]


def classify(spec: str, base_tokenizer, kind: str = "reward") -> Route:
    """Decide how a reward or value spec runs; raise GuideError with one clear line if it cannot."""
    if spec.startswith(TEXT_PREFIX):
        if kind != "reward":
            raise GuideError(f"{spec!r}: a {kind} model must be a neural model, not a text function")
        load_text_reward(spec)
        return Route.text
    from alignd.rewards.cached_attention import unsupported_reason

    cfg, tok = _load_config_and_tokenizer(spec)
    if not _architecture(cfg).endswith("ForSequenceClassification"):
        raise GuideError(f"{spec!r}: a {kind} model must be *ForSequenceClassification, found {_architecture(cfg)}")
    if cfg.num_labels != 1:
        raise GuideError(f"{spec!r}: a {kind} model needs exactly one label, found {cfg.num_labels}")
    if not same_vocab(tok, base_tokenizer):
        return Route.retokenized
    return Route.uncached if unsupported_reason(cfg) else Route.cached


def check_lm(spec: str, base_tokenizer, base_vocab_size: int, role: str) -> None:
    """A reference or baseline LM must share the served model's vocabulary token for token
    (its logits are mixed with, or its tokens fed to, the served model's) and take the cached path."""
    from alignd.rewards.cached_attention import unsupported_reason

    cfg, tok = _load_config_and_tokenizer(spec)
    if not _architecture(cfg).endswith("ForCausalLM"):
        raise GuideError(f"{spec!r}: the {role} must be a *ForCausalLM model, found {_architecture(cfg)}")
    if not same_vocab(tok, base_tokenizer) or cfg.vocab_size != base_vocab_size:
        raise GuideError(
            f"{spec!r}: the {role} must have the served model's vocabulary (tokenizer and "
            f"vocab_size {base_vocab_size}, found {cfg.vocab_size})"
        )
    why = unsupported_reason(cfg)
    if why:
        raise GuideError(f"{spec!r}: the {role} cannot run in the engine: {why}")
