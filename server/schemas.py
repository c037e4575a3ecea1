"""The HTTP contract: OpenAI's request/response shapes plus the `alignment` extension.

Unknown OpenAI fields are ignored (clients send many); every field we read is validated here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from alignd.decoders.params import AlignmentParams


class StreamOptions(BaseModel):
    include_usage: bool = False


INT64 = 2**63
Stop = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
Text = Annotated[str, StringConstraints(min_length=1)]


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=64)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    alignment: AlignmentParams | None = None
    return_token_ids: bool = Field(False, description="also return each choice's token ids")
    ignore_eos: bool = Field(False, description="keep generating past end-of-sequence (benchmarks)")
    min_tokens: int = Field(0, ge=0, description="end-of-sequence is not allowed before this many tokens")

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> list[str]:
        return [stop] if isinstance(stop, str) else list(stop or [])


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt):
        if isinstance(prompt, list) and (not prompt or any(p in ("", []) for p in prompt)):
            raise ValueError("prompt must not be empty")
        if prompt == "":
            raise ValueError("prompt must not be empty")
        return prompt


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class Candidate(BaseModel):
    text: str
    rewards: dict[str, float]
    total: float | None
    token_ids: list[int] | None = None


class ChoiceAlignment(BaseModel):
    decoder: str
    rewards: dict[str, float]  # the rewards of the returned text that could be computed
    total: float | None  # None when one of them failed (see notes)
    candidates: list[Candidate] | None = None
    notes: list[str] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None
