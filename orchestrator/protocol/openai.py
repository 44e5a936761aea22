"""OpenAI-compatible request and response models checked by the router.

The router validates what it can decide without a tokenizer (types, ranges, the model
name) and forwards the body as plain data; vLLM's serving layer does the rest. Unknown
fields are kept (``extra="allow"``) so vLLM's sampling extensions (``top_k``, ``min_p``,
``repetition_penalty``...) pass through.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Bounds on what one request may carry, checked before anything is reserved or forwarded.
MAX_MESSAGES = 2048
MAX_PROMPTS = 128  # prompts in one completions request (a list of strings or of token lists)
MAX_TOOLS = 128
MAX_LOGIT_BIAS = 300  # entries; each bias is between -100 and 100
MAX_STOP = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value and any(not -100 <= bias <= 100 for bias in value.values()):
            raise ValueError("every bias must be between -100 and 100")
        return value

    def output_budget(self) -> int | None:
        """The requested output-token cap, if the client set one."""
        return self.max_tokens


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions`` body."""

    messages: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _messages_have_roles(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for message in value:
            if not isinstance(message.get("role"), str):
                raise ValueError("every message needs a string `role`")
        return value

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") not in ("text", "json_object", "json_schema", "structural_tag"):
            raise ValueError("type must be one of text, json_object, json_schema")
        return value

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    def output_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions`` body."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=128)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        if isinstance(value, list) and not isinstance(value[0], int) and len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return value


class ModelPricing(BaseModel):
    input_per_million: Decimal
    output_per_million: Decimal


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``: OpenAI's fields plus what the catalog knows."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "orchestrator"
    aliases: list[str]
    backend_id: str
    description: str
    context_window: int
    pricing: ModelPricing
    capabilities: dict[str, bool]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
