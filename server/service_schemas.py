"""Request and response shapes of the routes around generation: /v1/models, /v1/rewards,
/tokenize, /detokenize, /version and /health (schemas.py has the generation endpoints')."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from alignd.server.schemas import ChatMessage, TemplateVariables, Text, TokenId, omitted


class GuideCard(BaseModel):
    name: str
    kind: Literal["reward", "value", "reference", "baseline"]
    spec: str = Field(description="the folder, hub id or py: function it was configured with")
    route: str | None = Field(description="scorers: cached, retokenized, uncached or text; null for language models")


class DecoderCard(BaseModel):
    name: str
    runs: Literal["engine", "request"] = Field(description="in every engine step, or by ranking whole samples or "
                                                           "blocks (best_of_n's pruning also reads the engine steps)")
    needs: list[str]
    parameters: dict[str, dict[str, Any]] = Field(description="the alignment fields it reads, as JSON schemas")


class ModelAlignment(BaseModel):
    decoders: list[str]
    rewards: list[str]
    values: list[str]
    guides: list[GuideCard]
    decoder_details: list[DecoderCard]


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


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or messages through the chat template (with the assistant's
    turn opened, as /v1/chat/completions encodes them)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = Field(True, description="prompt only: as /v1/completions encodes it")
    chat_template_kwargs: TemplateVariables | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[TokenId] = Field(max_length=1_000_000)


class DetokenizeResponse(BaseModel):
    prompt: str


class Version(BaseModel):
    version: str = Field(description="alignd's")
    vllm: str


Weights = dict[str, Annotated[float, Field(ge=-1e6, le=1e6)]]


class RewardsRequest(BaseModel):
    """`POST /v1/rewards`: score texts with the server's reward (and value) models."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    input: Text | list[int] | list[Text | list[int] | list[ChatMessage]] = Field(
        description="a text, token ids, or a list of texts, token ids and conversations (a conversation goes "
        "through the chat template without a generation prompt)")
    rewards: Weights | list[str] | None = Field(
        None, description="reward name -> weight, or names (weight 1); default: every reward, weight 1")
    values: Weights | list[str] | None = Field(None, description="value name -> weight, or names (weight 1)")

    def inputs(self) -> list[str | list[int] | list[ChatMessage]]:
        one = isinstance(self.input, str) or (bool(self.input) and isinstance(self.input[0], int))
        return [self.input] if one else list(self.input)  # type: ignore[list-item]

    @field_validator("input")
    @classmethod
    def _input(cls, value):
        if isinstance(value, list) and (not value or any(v == [] for v in value)):
            raise ValueError("input must not be empty")
        return value


class RewardScore(BaseModel):
    index: int
    rewards: dict[str, float]
    values: dict[str, float] | None = omitted("when the request names value models")
    total: float | None = Field(description="the weighted sum; null when one of the scores failed")
    tokens: int
    notes: list[str] | None = omitted("why a score failed")


class RewardsUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RewardsResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[RewardScore]
    usage: RewardsUsage
