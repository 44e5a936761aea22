"""``POST /tokenize`` and ``POST /detokenize`` bodies, as vLLM's server has them.

The router checks the types and the model; the model's replica tokenizes with vLLM's own
tokenization serving (the chat template applied exactly as for a chat request). Unknown
fields are kept and forwarded, as on the generation routes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import JsonDict, WithJsonSchema

from orchestrator.protocol.openai import MAX_MESSAGES, MAX_TOOLS
from orchestrator.protocol.values import Boolean, TokenId

TokensOp = Literal["tokenize", "detokenize"]

_ONE_INPUT: JsonDict = {"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]}
_MESSAGES: JsonDict = {"items": {"type": "object", "required": ["role"], "properties": {"role": {"type": "string"}}}}
_MESSAGE_LIST: JsonDict = {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES, **_MESSAGES}


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` body: a ``prompt`` (plain text), or chat ``messages`` rendered by the
    model's chat template (with ``tools`` if given)."""

    # Exactly one of the two, neither of them null: what the schema says is what is checked.
    model_config = ConfigDict(extra="allow", json_schema_extra=_ONE_INPUT)

    model: str = Field(min_length=1)
    prompt: Annotated[str | None, WithJsonSchema({"type": "string"})] = Field(
        default=None, description="Text to tokenize as it is."
    )
    messages: Annotated[list[dict[str, Any]] | None, WithJsonSchema(_MESSAGE_LIST)] = Field(
        default=None,
        min_length=1,
        max_length=MAX_MESSAGES,
        description="A chat to tokenize under the model's chat template (instead of `prompt`).",
    )
    add_special_tokens: Boolean | None = Field(
        default=None,
        description="Add the tokenizer's special tokens (BOS...): by default for a prompt, not for messages.",
    )
    add_generation_prompt: Boolean | None = Field(
        default=None, description="Messages only: end with the assistant's turn header (default true)."
    )
    continue_final_message: Boolean | None = Field(
        default=None, description="Messages only: leave the last message open (not with add_generation_prompt)."
    )
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS, description="Messages only.")
    return_token_strs: Boolean | None = Field(default=None, description="Also return each token's string.")

    @field_validator("prompt", "messages", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("must not be null (leave it out)")
        return value

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of `prompt` and `messages`")
        if self.messages is not None and any(not isinstance(m.get("role"), str) for m in self.messages):
            raise ValueError("every message needs a string `role`")
        return self

    def forwarded(self) -> dict[str, Any]:
        """The body for the model replica: what the client set (a null option means vLLM's default)."""
        return self.model_dump(mode="json", exclude_unset=True, exclude_none=True)


class DetokenizeRequest(BaseModel):
    """``POST /detokenize`` body."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    tokens: list[TokenId] = Field(description="Token ids of the model's vocabulary.")

    def forwarded(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)


class TokenizeResponse(BaseModel):
    """``POST /tokenize`` answer (vLLM's)."""

    count: int = Field(description="How many tokens.")
    max_model_len: int = Field(description="The model's context window.")
    tokens: list[int]
    token_strs: list[str] | None = Field(default=None, description="With `return_token_strs`.")


class DetokenizeResponse(BaseModel):
    """``POST /detokenize`` answer (vLLM's)."""

    prompt: str = Field(description="The text of the tokens.")
