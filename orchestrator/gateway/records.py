"""Plain-data records of the gateway: keys, admissions, usage. They cross Ray handles and
JSON, so they are pydantic models without behaviour beyond small derived views."""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from orchestrator.protocol.values import Boolean, OptionalInteger

# Bounds that the database columns can hold (gateway/schema.py): USD amounts are whole
# nanodollars in a 64-bit integer (up to 9.2e9 USD, so a balance topped up to MAX_USD still
# has room for any debit), rates are 32-bit integers.
MAX_USD = Decimal(1_000_000_000)
MAX_RATE = 1_000_000_000
MAX_MODEL_PATTERNS = 256


# USD amounts are JSON numbers or, exactly, decimal numerals such as "12.50". A Decimal's own
# JSON Schema allows any string, so strings are held to the patterns the OpenAPI document shows.
_WHOLE = r"[1-9][0-9]{0,8}(\.[0-9]+)?|1000000000(\.0+)?"
_AMOUNT = f"^({_WHOLE}|0(\\.[0-9]+)?)$"
_POSITIVE_AMOUNT = f"^({_WHOLE}|0\\.[0-9]*[1-9][0-9]*)$"


def _numeral(pattern: str, low: str) -> BeforeValidator:
    numeral = re.compile(pattern)

    def check(value: Any) -> Any:
        if isinstance(value, str) and not numeral.fullmatch(value):
            raise ValueError(f'a USD amount {low} up to {MAX_USD}: a number, or a decimal numeral such as "12.50"')
        return value

    return BeforeValidator(check)


def _usd_schema(pattern: str, low: dict[str, int]) -> WithJsonSchema:
    number = {"type": "number", **low, "maximum": int(MAX_USD)}
    return WithJsonSchema({"anyOf": [number, {"type": "string", "pattern": pattern}]})


Usd = Annotated[Decimal, Field(ge=0, le=MAX_USD), _numeral(_AMOUNT, "from 0"), _usd_schema(_AMOUNT, {"minimum": 0})]
"""A USD amount from 0 to MAX_USD."""
PositiveUsd = Annotated[
    Decimal,
    Field(gt=0, le=MAX_USD),
    _numeral(_POSITIVE_AMOUNT, "above 0"),
    _usd_schema(_POSITIVE_AMOUNT, {"exclusiveMinimum": 0}),
]
"""A USD amount above 0, up to MAX_USD."""


class Workspace(BaseModel):
    """A group of keys that can be locked as a whole."""

    id: str
    name: str
    enabled: bool = True
    created_at: datetime


class KeyLimits(BaseModel):
    """What an admin may set on a key (create and update). ``None`` means unlimited."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200, description="Human name of the key.")
    models: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None,
        max_length=MAX_MODEL_PATTERNS,
        description="Allowed model names or glob patterns (`tiny-*`); empty or unset: all models.",
    )
    rpm: OptionalInteger = Field(default=None, ge=1, le=MAX_RATE, description="Requests per minute.")
    tpm: OptionalInteger = Field(
        default=None, ge=1, le=MAX_RATE, description="Tokens (prompt + max output) per minute."
    )
    max_concurrent: OptionalInteger = Field(
        default=None, ge=1, le=MAX_RATE, description="Requests of this key running at once (past it: 429)."
    )
    credits: Usd | None = Field(default=None, description="Credit balance in USD; unset: no balance kept.")
    daily_limit: Usd | None = Field(default=None, description="Spend limit per UTC day, USD.")
    monthly_limit: Usd | None = Field(default=None, description="Spend limit per UTC month, USD.")
    enabled: Boolean | None = Field(default=None, description="A disabled key gets 403 workspace_locked.")


class KeyInfo(BaseModel):
    """A key as admins see it: everything but the secret (only a hint of it)."""

    id: str
    hint: str
    name: str
    workspace_id: str
    models: list[str] = Field(default_factory=list)
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    credits: Decimal | None = None
    daily_limit: Decimal | None = None
    monthly_limit: Decimal | None = None
    enabled: bool = True
    revoked_at: datetime | None = None
    created_at: datetime


class KeyRecord(KeyInfo):
    """A key as stored: the public fields plus the keyed hash of the secret."""

    key_hash: str

    def info(self) -> KeyInfo:
        return KeyInfo.model_validate(self.model_dump(exclude={"key_hash"}))


class CreatedKey(BaseModel):
    """The answer to a key creation: the only time the plaintext key is shown."""

    key: str
    info: KeyInfo


class Admission(BaseModel):
    """A request let through: who made it and what it reserved."""

    request_id: str
    key_id: str | None = None
    workspace_id: str | None = None
    reserved_tokens: int = 0
    window_start: float = 0.0
    headers: dict[str, str] = Field(default_factory=dict)


class UsageRecord(BaseModel):
    """One request that passed admission, however it ended."""

    request_id: str
    key_id: str | None = None
    workspace_id: str | None = None
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost: Decimal = Decimal(0)
    ttft_ms: float | None = None
    latency_ms: float = 0.0
    tokens_per_s: float | None = None
    finish_reason: str | None = None
    streamed: bool = False
    cancelled: bool = False
    status_code: int = 200
    error_code: str | None = None
    created_at: datetime

    def public(self) -> dict[str, Any]:
        """Returns the record as ``GET /v1/generation`` shows it (``id`` = ``gen-...``)."""
        data = self.model_dump(mode="json")
        data["id"] = "gen-" + data.pop("request_id")
        data["cost"] = float(self.cost)
        data["total_tokens"] = self.prompt_tokens + self.completion_tokens
        return data
