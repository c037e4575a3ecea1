"""The HTTP contract: OpenAI's request/response shapes plus the `alignment` extension.

Unknown OpenAI fields are ignored (clients send many); every field we read is validated here.
A response field that is None goes out as null (OpenAI's clients expect `logprobs`,
`finish_reason` and `alignment.total` to be there), unless it is declared with `omitted()`:
then it is left out of the JSON, as an extra nobody asked for should be.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

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


def omitted(description: str | None = None) -> Any:
    """A response field that is left out of the JSON while it is None."""
    return Field(None, exclude_if=lambda value: value is None, description=description)


class Candidate(BaseModel):
    text: str
    rewards: dict[str, float]
    total: float | None
    token_ids: list[int] | None = omitted("when the request asks for return_token_ids")


class ChoiceAlignment(BaseModel):
    decoder: str
    rewards: dict[str, float]  # the rewards of the returned text that could be computed
    total: float | None  # None when one of them failed (see notes)
    candidates: list[Candidate] | None = omitted("best_of_n with return_candidates: every sample")
    notes: list[str] | None = omitted("why a reward or a guide failed")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


# -- responses ------------------------------------------------------------------------------------
class _Choice(BaseModel):
    index: int
    logprobs: None = None  # never computed; the key is part of OpenAI's shape
    finish_reason: str | None  # null until a streamed choice's last chunk


class CompletionChoice(_Choice):
    text: str
    token_ids: list[int] | None = omitted("when the request asks for return_token_ids")
    alignment: ChoiceAlignment | None = omitted("when the request asks for a decoder")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: AssistantMessage
    token_ids: list[int] | None = omitted("when the request asks for return_token_ids")
    alignment: ChoiceAlignment | None = omitted("when the request asks for a decoder")


class ChatDelta(BaseModel):
    content: str
    role: Literal["assistant"] | None = omitted("in each choice's first chunk")


class ChatChunkChoice(_Choice):
    delta: ChatDelta
    alignment: ChoiceAlignment | None = omitted("in each choice's last chunk, when the request asks for a decoder")


class _Envelope(BaseModel):
    id: str
    object: str
    created: int
    model: str


class Completion(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(Completion):
    """As OpenAI's: a piece of a completion is a completion, with fewer choices or none."""

    # With stream_options.include_usage: null in every chunk but an extra last one (no choices).
    usage: Usage | None = None


class ChatCompletion(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # as in CompletionChunk


class ModelAlignment(BaseModel):
    decoders: list[str]
    rewards: list[str]
    values: list[str]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "alignd"
    max_model_len: int
    alignment: ModelAlignment


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "draining"] = "ok"
