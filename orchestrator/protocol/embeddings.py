"""``POST /v1/embeddings``: OpenAI's request and response.

The router checks the types, the model and the batch's size in inputs; the model's replica
runs vLLM's own embedding serving (its pooling runner), which tokenizes, checks each input
against the context window and the ``dimensions`` the model allows. Unknown fields are kept
and forwarded (vLLM's extensions, such as ``truncate_prompt_tokens``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import JsonDict

from orchestrator.protocol.openai import prompt_count
from orchestrator.protocol.values import Integer, TokenId

# OpenAI's bound on the inputs of one request; a catalog entry may set a lower one.
MAX_INPUTS = 2048

_INPUT: JsonDict = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_INPUTS},
        {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}, "minItems": 1},
        {
            "type": "array",
            "items": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
                "minItems": 1,
            },
            "minItems": 1,
            "maxItems": MAX_INPUTS,
        },
    ]
}


def input_tokens(value: Any) -> int:
    """Returns the tokens of an ``input`` given as token ids (0 for text, which only the
    model's tokenizer counts)."""
    if isinstance(value, list) and value and isinstance(value[0], int):
        return len(value)
    if isinstance(value, list) and value and isinstance(value[0], list):
        return sum(len(ids) for ids in value)
    return 0


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings`` body."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of token-id lists.",
        json_schema_extra=_INPUT,
    )
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="`base64`: each vector as little-endian float32 bytes, base64-encoded."
    )
    dimensions: Integer | None = Field(
        default=None, ge=1, description="Shorter vectors, for models trained for it (Matryoshka); else 400."
    )
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if value == "" or value == []:
            raise ValueError("input must not be empty")
        if isinstance(value, list) and any(v == "" or v == [] for v in value):
            raise ValueError("no input may be empty")
        if prompt_count(value) > MAX_INPUTS:
            raise ValueError(f"at most {MAX_INPUTS} inputs per request")
        return value

    def output_budget(self) -> int:
        """An embedding generates nothing: no output tokens are reserved."""
        return 0

    def capabilities_used(self) -> set[str]:
        return set()

    def forwarded(self) -> dict[str, Any]:
        """The body for the model replica: what the client set, except ``stream`` (an
        embedding is one JSON answer)."""
        body = self.model_dump(mode="json", exclude_unset=True)
        body.pop("stream", None)
        return body


class EmbeddingUsage(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt_tokens: int
    total_tokens: int
    cost: float = Field(description="USD, from the model's catalog prices.")


class Embedding(BaseModel):
    model_config = ConfigDict(extra="allow")

    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of little-endian float32s.")


class EmbeddingList(BaseModel):
    """``POST /v1/embeddings`` answer: OpenAI's (and vLLM's), with ``usage.cost``."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(description="`gen-<id>`: what `GET /v1/generation?id=` looks up.")
    object: Literal["list"]
    model: str
    data: list[Embedding]
    usage: EmbeddingUsage
