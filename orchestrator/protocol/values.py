"""JSON Schema's scalar types as pydantic field types, so that a field accepts exactly what
the OpenAPI document says it takes.

Pydantic's default (lax) mode turns ``"2"`` and ``true`` into the integer 2 and 1 and
``"false"`` into False, which a JSON Schema refuses; its strict mode refuses ``2.0``, which a
JSON Schema counts as an integer. These take the JSON Schema's side both ways. The optional
forms wrap the whole ``X | None`` so that a field's bounds (``Field(ge=1)``) still reach the
document.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field, StrictBool


def _no_coercion(kind: str) -> BeforeValidator:
    def check(value: Any) -> Any:
        # A bool is an int in Python, and pydantic would parse a numeral string.
        if isinstance(value, bool | str):
            raise ValueError(f"Input should be a valid {kind}")
        return value

    return BeforeValidator(check)


Integer = Annotated[int, _no_coercion("integer")]
"""A JSON integer (``2.0`` included, as JSON Schema has it); never a string or a boolean."""
OptionalInteger = Annotated[int | None, _no_coercion("integer")]
Number = Annotated[float, _no_coercion("number")]
"""A JSON number; never a string or a boolean."""
OptionalNumber = Annotated[float | None, _no_coercion("number")]
TokenId = Annotated[int, Field(ge=0, lt=2**31), _no_coercion("integer")]
"""A token id: a JSON integer from 0 below 2**31 (vocabularies are far smaller; a bound
that a double represents exactly, so clients comparing as floats agree with it)."""
Boolean = StrictBool
"""``true`` or ``false``; never ``1`` or ``"true"``."""

CacheSalt = Annotated[
    str | None,
    Field(
        min_length=1,
        max_length=128,
        pattern=r"^[^@/\\\x00]+$",  # vLLM's own bounds: at most 128 characters, none of @ / \ NUL
        description=(
            "Splits the prompt-prefix cache: requests reuse cached prefixes only with the same salt. "
            "Combined with the key's workspace (workspaces never share cached prefixes), never used alone."
        ),
    ),
]
"""vLLM's ``cache_salt``, as a client may send it (see ``orchestrator/api/cache_salt.py``)."""

__all__ = ["Boolean", "CacheSalt", "Integer", "Number", "OptionalInteger", "OptionalNumber", "TokenId"]
