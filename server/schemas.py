"""The HTTP contract: OpenAI's request/response shapes plus the `alignment` extension.

Every field either works or is refused: an unknown field is a 400 naming it. OpenAI fields that
alignd does not implement are accepted only when they ask for nothing (null, or false), as
clients and proxies send them that way.
A response field that is None goes out as null (OpenAI's clients expect `logprobs`,
`finish_reason` and `alignment.total` to be there), unless it is declared with `omitted()`:
then it is left out of the JSON, as an extra nobody asked for should be.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator, model_validator

from alignd.decoders.params import AlignmentParams


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="usage so far in every chunk (vLLM's extra)")


INT64 = 2**63
Stop = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
Text = Annotated[str, StringConstraints(min_length=1)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]

# OpenAI fields alignd does not implement: accepted when they ask for nothing, a 400 otherwise.
OFF_WHEN_NULL = frozenset({
    "tools", "tool_choice", "functions", "function_call",
    "parallel_tool_calls", "suffix", "best_of", "store", "metadata", "service_tier", "modalities", "audio",
    "prediction", "reasoning_effort", "web_search_options",
})


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given exactly when type is 'json_schema'")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: one constraint, compiled to a grammar the engine masks with."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: dict[str, Any] | Annotated[str, StringConstraints(min_length=1)] | None = Field(None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1, max_length=256)] | None = None
    grammar: Annotated[str, StringConstraints(min_length=1)] | None = None
    json_object: Literal[True] | None = None
    disable_any_whitespace: bool = False

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        given = [f for f in ("json_", "regex", "choice", "grammar", "json_object") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar, json_object")
        return self


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    def top_logprobs_asked(self) -> int | None:
        """With logprobs asked for: how many alternatives per token (else None)."""
        return None

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
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="vLLM's: > 1 discourages repeats")
    top_k: int | None = Field(None, ge=-1, le=100_000, description="vLLM's: sample among the k likeliest; 0 or -1: off")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="vLLM's: drop tokens below min_p x the likeliest's probability")
    stop_token_ids: list[TokenId] = Field(default_factory=list, max_length=64, description="vLLM's: end on these ids")
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(None, max_length=300)
    user: Annotated[str, StringConstraints(max_length=256)] | None = Field(
        None, description="accepted as OpenAI's; alignd neither logs nor stores it")
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's: a JSON schema, regex, choice or grammar the output must follow")
    alignment: AlignmentParams | None = None
    return_token_ids: bool = Field(False, description="also return each choice's token ids")
    ignore_eos: bool = Field(False, description="keep generating past end-of-sequence (benchmarks)")
    min_tokens: int = Field(0, ge=0, description="end-of-sequence is not allowed before this many tokens")

    @model_validator(mode="before")
    @classmethod
    def _unimplemented(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (k in OFF_WHEN_NULL and v in (None, False))}
        return data

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> list[str]:
        return [stop] if isinstance(stop, str) else list(stop or [])

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, bias: dict[str, float] | None) -> dict[int, float] | None:
        if not bias:
            return None
        try:
            return {int(token): value for token, value in bias.items()}
        except ValueError:
            raise ValueError("the keys are token ids (strings of integers), as in OpenAI's API") from None

    @field_validator("structured_outputs")
    @classmethod
    def _one_constraint(cls, so: StructuredOutputs | None, info: ValidationInfo) -> StructuredOutputs | None:
        rf = info.data.get("response_format")
        if so is not None and rf is not None and rf.type != "text":
            raise ValueError("give response_format or structured_outputs, not both")
        return so

    def constraint(self) -> dict[str, Any] | None:
        """vLLM's StructuredOutputsParams fields for the output constraint asked for, if any."""
        rf, so = self.response_format, self.structured_outputs
        if so is not None:
            return so.model_dump(by_alias=True, exclude_none=True)
        if rf is None or rf.type == "text":
            return None
        schema = rf.json_schema.schema_ if rf.json_schema is not None else None
        return {"json": schema} if schema else {"json_object": True}

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return options


MAX_LOGPROBS = 20  # vLLM's default --max-logprobs


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = Field(False, description="each choice's text starts with its prompt")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="each token's logprob and this many alternatives")

    @field_validator("logprobs")
    @classmethod
    def _no_prompt_logprobs(cls, logprobs: int | None, info: ValidationInfo) -> int | None:
        if logprobs is not None and info.data.get("echo"):
            raise ValueError("echo with logprobs would need the prompt's logprobs, which alignd does not return")
        return logprobs

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt):
        if isinstance(prompt, list) and (not prompt or any(p in ("", []) for p in prompt)):
            raise ValueError("prompt must not be empty")
        if prompt == "":
            raise ValueError("prompt must not be empty")
        return prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart]
    name: Annotated[str, StringConstraints(max_length=256)] | None = Field(
        None, description="given to the chat template, which may use it")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def template_dict(self) -> dict[str, str]:
        """The message as chat templates read it."""
        return {"role": self.role, "content": self.text(), **({"name": self.name} if self.name else {})}


# Variables only: these names are apply_chat_template's own arguments, not the template's.
TEMPLATE_ARGUMENTS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})


def _template_variables(kwargs: dict[str, Any]) -> dict[str, Any]:
    taken = sorted(set(kwargs) & TEMPLATE_ARGUMENTS)
    if taken:
        raise ValueError(f"{taken[0]!r} is an argument of apply_chat_template, not a template variable")
    return kwargs


TemplateVariables = Annotated[dict[str, Any], Field(max_length=32), AfterValidator(_template_variables)]


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    chat_template_kwargs: TemplateVariables | None = Field(
        None, description="extra variables for the chat template, e.g. enable_thinking (vLLM's)")
    logprobs: bool | None = Field(None, description="each token's logprob")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="with logprobs: this many alternatives")

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("only with logprobs: true")
        return top

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def omitted(description: str | None = None) -> Any:
    """A response field that is left out of the JSON while it is None."""
    return Field(None, exclude_if=lambda value: value is None, description=description)


class Candidate(BaseModel):
    text: str
    rewards: dict[str, float]
    total: float | None
    token_ids: list[int] | None = omitted("when the request asks for return_token_ids")
    pruned_at: int | None = omitted("a pruned sample: the checkpoint (generated tokens) it was stopped at; its "
                                    "text is partial and has no final rewards")
    total_at_pruning: float | None = omitted("a pruned sample: the weighted reward of its first pruned_at tokens "
                                             "(null if it could not be computed)")


class PruneCheckpoint(BaseModel):
    at: int = Field(description="generated tokens")
    live: int = Field(description="samples still running there")
    pruned: int = Field(description="of them, stopped there")


class ChoiceAlignment(BaseModel):
    decoder: str
    rewards: dict[str, float]  # the rewards of the returned text that could be computed
    total: float | None  # None when one of them failed (see notes)
    candidates: list[Candidate] | None = omitted("best_of_n with return_candidates: every sample")
    logprob_sum: float | None = omitted("with logprobs: the returned tokens' logprobs under the distribution "
                                        "sampled from, summed")
    base_logprob_sum: float | None = omitted("with logprobs: the same tokens' logprobs under the base model, "
                                             "summed (logprob_sum minus this estimates the KL from the base)")
    base_logprobs: list[float | None] | None = omitted("streams with logprobs: each token's base-model logprob")
    pruning: list[PruneCheckpoint] | None = omitted("best_of_n with prune: what each checkpoint stopped")
    unpruned_tokens: int | None = omitted("best_of_n with prune: n x max_tokens, the most its samples could "
                                          "have made without pruning (sampled_tokens is what they made)")
    reused_prefix_tokens: int | None = omitted("blockwise: prompt tokens of its rounds that the base model's "
                                               "prefix cache served instead of recomputing them")
    sampled_tokens: int | None = omitted("best_of_n: the tokens of all this choice's samples (usage counts "
                                         "the returned one's)")
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
class TokenAlignment(BaseModel):
    base_logprob: float | None = Field(description="the token's logprob under the base model alone")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]
    base_token_logprobs: list[float | None] | None = omitted("aligned requests: each token's base-model logprob")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]
    alignment: TokenAlignment | None = omitted("aligned requests, whole answers")


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class _Choice(BaseModel):
    index: int
    logprobs: CompletionLogprobs | ChatLogprobs | None = None  # null unless asked for: OpenAI's shape
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
