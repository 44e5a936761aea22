"""OpenAI-compatible request and response models checked by the router.

The router validates what it can decide without a tokenizer (types, ranges, the model
name) and forwards the body as plain data; vLLM's serving layer does the rest. Unknown
fields are kept (``extra="allow"``) so vLLM's sampling extensions (``top_k``, ``min_p``,
``repetition_penalty``...) pass through. Declared fields take what the OpenAPI document says
(``orchestrator.protocol.values``: ``"2"`` is not an ``n``, nor ``"false"`` a ``stream``), so
what the router reads from the body is what it validated.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import JsonDict

from orchestrator.errors import ErrorCode
from orchestrator.protocol.media import MediaPart, chat_media, media_capabilities
from orchestrator.protocol.values import Boolean, CacheSalt, Integer, Number, OptionalInteger, OptionalNumber

# Bounds on what one request may carry, checked before anything is reserved or forwarded.
MAX_MESSAGES = 2048
MAX_PROMPTS = 128  # prompts in one completions request (a list of strings or of token lists)
MAX_TOOLS = 128
MAX_LOGIT_BIAS = 300  # entries; each bias is between -100 and 100
MAX_STOP = 16
RESPONSE_FORMATS = ("text", "json_object", "json_schema", "structural_tag")

# The validators below give clearer messages than pydantic's constraints would; these
# schemas say the same in the OpenAPI document, so that clients (and the contract test) see
# every rule the router enforces.
_BIASES: JsonDict = {"additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}
_STOPS: JsonDict = {"maxItems": MAX_STOP}
_MESSAGES: JsonDict = {"items": {"type": "object", "required": ["role"], "properties": {"role": {"type": "string"}}}}
_FORMAT: JsonDict = {"required": ["type"], "properties": {"type": {"enum": [*RESPONSE_FORMATS]}}}
_PROMPT: JsonDict = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_PROMPTS},
        {"type": "array", "items": {"type": "integer"}, "minItems": 1},
        {
            "type": "array",
            "items": {"type": "array", "items": {"type": "integer"}},
            "minItems": 1,
            "maxItems": MAX_PROMPTS,
        },
    ]
}
_BEST_OF: JsonDict = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 1}, {"type": "null"}]}
_TOP_LOGPROBS: JsonDict = {
    "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer", "minimum": 1}}},
    "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
}


def prompt_count(prompt: Any) -> int:
    """Returns how many prompts a completions ``prompt`` holds: a list of strings or of
    token lists is one prompt each; a string or one list of token ids is one prompt."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: Boolean | None = None
    continuous_usage_stats: Boolean | None = None


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    stream: Boolean = False
    stream_options: StreamOptions | None = None
    max_tokens: OptionalInteger = Field(default=None, ge=1)
    temperature: OptionalNumber = Field(default=None, ge=0, le=2)
    top_p: OptionalNumber = Field(default=None, gt=0, le=1)
    n: Integer = Field(default=1, ge=1, le=128)
    stop: str | list[str] | None = Field(default=None, json_schema_extra=_STOPS)
    seed: OptionalInteger = Field(default=None, ge=-(2**63), lt=2**64)
    presence_penalty: OptionalNumber = Field(default=None, ge=-2, le=2)
    frequency_penalty: OptionalNumber = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, Number] | None = Field(default=None, max_length=MAX_LOGIT_BIAS, json_schema_extra=_BIASES)
    user: str | None = None
    cache_salt: CacheSalt = None
    best_of: OptionalInteger = Field(
        default=None,
        description="Not supported: vLLM 0.32 ignores it. Only 1 (or null) is accepted; anything else gets 400.",
        json_schema_extra=_BEST_OF,
    )

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("best_of is not supported (vLLM ignores it); leave it out or send 1")
        return value

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

    def capabilities_used(self) -> set[str]:
        """What of the model's capabilities the request needs (catalog names)."""
        return set()


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions`` body."""

    model_config = ConfigDict(json_schema_extra=_TOP_LOGPROBS)

    messages: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_MESSAGES, json_schema_extra=_MESSAGES)
    max_completion_tokens: OptionalInteger = Field(default=None, ge=1)
    logprobs: Boolean | None = None
    top_logprobs: OptionalInteger = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = Field(default=None, json_schema_extra=_FORMAT)
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
        if value is not None and value.get("type") not in RESPONSE_FORMATS:
            raise ValueError(f"type must be one of {', '.join(RESPONSE_FORMATS)}")
        return value

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    def output_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def capabilities_used(self, media: Sequence[MediaPart] | None = None) -> set[str]:
        """What of the model's capabilities the request needs (catalog names); ``media``: its
        media parts, when the caller has read them already (:meth:`media`)."""
        used = set()
        if self.tools and self.tool_choice != "none":
            used.add("tools")
        if self.response_format is not None and self.response_format.get("type") in _GUIDED_FORMATS:
            used.add("json")
        used |= media_capabilities(self.media() if media is None else media)
        if getattr(self, "reasoning_effort", None) is not None:
            used.add("reasoning")
        return used

    def media(self) -> list[MediaPart]:
        """The media parts of the messages (images, and others no model here takes)."""
        return list(chat_media(self.messages))


_GUIDED_FORMATS = ("json_object", "json_schema", "structural_tag")


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions`` body."""

    prompt: str | list[str] | list[Integer] | list[list[Integer]] = Field(json_schema_extra=_PROMPT)
    echo: Boolean | None = None
    logprobs: OptionalInteger = Field(default=None, ge=0, le=20)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        if prompt_count(value) > MAX_PROMPTS:
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
    task: Literal["generate", "embed"] = Field(
        description="`generate`: chat, completions, Messages, Responses; `embed`: `/v1/embeddings` only."
    )
    parent: str | None = Field(default=None, description="For a LoRA adapter: the base model whose replicas serve it.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Usage(BaseModel):
    """A response's token counts; the router adds ``cost``."""

    model_config = ConfigDict(extra="allow")

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: float = Field(description="USD, from the model's catalog prices.")


class _Completion(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = Field(description="`gen-<id>`: what `GET /v1/generation?id=` looks up.")
    created: int
    model: str = Field(description="The model's display name.")
    choices: list[dict[str, Any]]
    usage: Usage


class ChatCompletion(_Completion):
    """``POST /v1/chat/completions`` answer without ``stream`` (vLLM's body plus ``usage.cost``)."""

    object: Literal["chat.completion"]


class TextCompletion(_Completion):
    """``POST /v1/completions`` answer without ``stream`` (vLLM's body plus ``usage.cost``)."""

    object: Literal["text_completion"]


_ERROR_TYPES: JsonDict = {"enum": [*sorted({code.error_type for code in ErrorCode})]}


class ErrorDetail(BaseModel):
    """The ``error`` of the envelope (built by :meth:`OrchestratorError.to_dict`)."""

    message: str = Field(description="For humans; never contains a key.")
    type: str = Field(
        description="OpenAI's error family of the code.",
        json_schema_extra=_ERROR_TYPES,
    )
    code: ErrorCode = Field(description="Stable; decides the HTTP status.")
    param: str | None = Field(description="The request parameter at fault, if one is.")
    request_id: str | None = Field(description="The `X-Request-Id` of the request, to quote when reporting.")


class ErrorResponse(BaseModel):
    """Every error answer, and the last event of a stream that failed part-way."""

    error: ErrorDetail
