"""Request cost from catalog prices (USD per million tokens), in exact Decimal."""

from __future__ import annotations

from decimal import Decimal

from orchestrator.catalog import Pricing

_MILLION = Decimal(1_000_000)
# Costs are kept in nanodollars (1e-9 USD, the unit of the database columns); one token of
# a $0.01/M model is 10 nanodollars.
COST_QUANTUM = Decimal("1e-9")


def request_cost(pricing: Pricing, prompt_tokens: int, completion_tokens: int) -> Decimal:
    """Returns the USD cost of one request.

    Raises:
        ValueError: a token count is negative.
    """
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError("token counts must not be negative")
    raw = (pricing.input_per_million * prompt_tokens + pricing.output_per_million * completion_tokens) / _MILLION
    return raw.quantize(COST_QUANTUM)
