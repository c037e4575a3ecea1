"""Per-token logprobs: what vLLM returns for each sampled token, the base model's own logprob of
it for aligned requests, and both endpoints' OpenAI shapes.

The engine runs with `logprobs_mode="processed_logprobs"`: a token's logprob is taken from the
distribution it was sampled from, after the decoder, the penalties, temperature and top-k/top-p
(for a plain request at temperature 1 without them: the model's own). The base model's logprob
of the same token comes from one prefill of prompt + completion with vLLM's prompt logprobs: the
served model alone, without logit_bias or an output constraint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from vllm.logprobs import Logprob

from alignd.server.schemas import (
    ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TokenAlignment, TopLogprob,
)


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)  # the likeliest alternatives, best first
    base: float | None = None  # under the base model alone (aligned requests)


# JSON has no -inf: a token the decoder ruled out (outside ARGS's candidates) reports this, as vLLM does.
FLOOR = -9999.0


def finite(logprob: float) -> float:
    # NaN too: scores that overflowed (a repetition_penalty near 0 divides them) have no logprob.
    return logprob if math.isfinite(logprob) else FLOOR


def from_engine(token_ids: Sequence[int], logprobs: Sequence[dict[int, Logprob]] | None, top: int) -> list[TokenLogprob]:
    """The sampled tokens' logprobs and their `top` alternatives, from a vLLM output."""
    if logprobs is None:
        return []
    out = []
    for token, at in zip(token_ids, logprobs):
        sampled = at[token]
        best = sorted((lp for lp in at.values() if lp.rank is not None and lp.rank <= top), key=lambda lp: lp.rank)
        out.append(TokenLogprob(sampled.decoded_token or "", finite(sampled.logprob),
                                [(lp.decoded_token or "", finite(lp.logprob)) for lp in best]))
    return out


def sums(tokens: list[TokenLogprob]) -> dict[str, float | None]:
    """The choice's `alignment` sums: under the distribution sampled from, and under the base."""
    base = [t.base for t in tokens]
    return {"logprob_sum": sum(t.logprob for t in tokens),
            "base_logprob_sum": None if any(b is None for b in base) else sum(base)}  # type: ignore[arg-type]


def _by_text(t: TokenLogprob) -> dict[str, float]:
    # Completions key alternatives by their text, and distinct tokens can decode alike (byte
    # pieces): each text keeps its likeliest token's logprob.
    out: dict[str, float] = {}
    for text, logprob in [*t.top, (t.token, t.logprob)]:
        out.setdefault(text, logprob)
    return out


def completion(tokens: list[TokenLogprob], aligned: bool, offset: int = 0) -> CompletionLogprobs:
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t.token)
    return CompletionLogprobs(
        tokens=[t.token for t in tokens], token_logprobs=[t.logprob for t in tokens],
        top_logprobs=[_by_text(t) for t in tokens], text_offset=offsets,
        base_token_logprobs=[t.base for t in tokens] if aligned else None)


def _top(token: str, logprob: float) -> TopLogprob:
    return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8", "surrogatepass")))


def chat(tokens: list[TokenLogprob], aligned: bool) -> ChatLogprobs:
    return ChatLogprobs(content=[
        ChatTokenLogprob(**_top(t.token, t.logprob).model_dump(), top_logprobs=[_top(*alt) for alt in t.top],
                         alignment=TokenAlignment(base_logprob=t.base) if aligned else None)
        for t in tokens])
