"""What generation hands the endpoints: whole choices, or a stream's pieces of them."""

from __future__ import annotations

from dataclasses import dataclass, field

from alignd.server.logprobs import TokenLogprob
from alignd.server.schemas import ChoiceAlignment


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    alignment: ChoiceAlignment | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Delta:
    """One streamed piece of one choice; the last one has a finish_reason (and alignment)."""

    index: int
    text: str
    finish_reason: str | None = None
    alignment: ChoiceAlignment | None = None
    logprobs: list[TokenLogprob] | None = None
    offset: int = 0  # characters of the choice's text before this piece
    token_ids: list[int] = field(default_factory=list)  # blockwise's: whole choices are built from them
