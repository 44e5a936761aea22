"""The admission rules: each check a request must pass before the ledger holds anything for
it, as functions that raise the refusal (the ledger runs them in order)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from decimal import Decimal

from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.books import Funds
from orchestrator.gateway.limiter import LimitDecision, concurrency_headers
from orchestrator.gateway.records import KeyInfo, KeyRecord


def model_allowed(patterns: Sequence[str], names: Sequence[str]) -> bool:
    """True when ``patterns`` is empty or one of them matches one of the model's names."""
    if not patterns:
        return True
    lowered = [n.lower() for n in names]
    return any(fnmatch.fnmatchcase(n, p.lower()) for p in patterns for n in lowered)


def handing_over() -> OrchestratorError:
    """503 ``service_unavailable`` for an admission while another ledger holds the fence."""
    return OrchestratorError(
        ErrorCode.SERVICE_UNAVAILABLE,
        "The gateway is handing over to a new instance; retry shortly.",
        headers={"Retry-After": "2"},
    )


def check_model(key: KeyInfo | None, model_names: Sequence[str]) -> None:
    """Raises 403 ``model_not_allowed`` unless the key may use the model named ``model_names``
    (all its names; the first is the one the message gives). No key (open mode): every model."""
    if key is not None and not model_allowed(key.models, model_names):
        raise OrchestratorError(
            ErrorCode.MODEL_NOT_ALLOWED, f"This API key may not use the model {model_names[0]!r}.", param="model"
        )


def check_funds(key: KeyRecord, cost: Decimal, held: Decimal, funds: Funds) -> None:
    """Raises unless the key's balance, and its spend limits if it has any, leave room for
    ``cost`` beside the ``held`` costs of its running requests.

    ``funds`` is the ledger's view as it is now (:meth:`Books.funds`), not ``key`` as
    authenticated: the database thread may have committed records since, and a commit moves
    their costs from pending to the cached balance in one step.

    Raises:
        OrchestratorError: 401 ``invalid_api_key`` (the key's row is gone),
        402 ``insufficient_credits``, 402 ``key_limit_exceeded``.
    """
    current = funds.current
    if current is None or current.id != key.id:
        raise OrchestratorError(ErrorCode.INVALID_API_KEY, "Invalid API key.")
    if current.credits is not None:
        _check_balance(current.credits - funds.pending - held, cost)
    if funds.totals is None:
        return
    for limit, total, period in (
        (key.daily_limit, funds.totals[0], "daily"),
        (key.monthly_limit, funds.totals[1], "monthly"),
    ):
        if limit is not None and (total >= limit or total + held + cost > limit):
            raise OrchestratorError(
                ErrorCode.KEY_LIMIT_EXCEEDED,
                f"This API key reached its {period} spend limit of ${limit} "
                f"(spent ${total}, ${held} held by running requests, this one may cost up to ${cost}).",
            )


def _check_balance(available: Decimal, cost: Decimal) -> None:
    if available <= 0:
        raise OrchestratorError(ErrorCode.INSUFFICIENT_CREDITS, "This API key has no credits left.")
    if cost > available:
        raise OrchestratorError(
            ErrorCode.INSUFFICIENT_CREDITS,
            f"This request may cost up to ${cost} and ${available} of this key's credits are free. "
            "Lower max_tokens (or n), wait for running requests to finish, or add credits.",
        )


def check_concurrency(key: KeyRecord, running: int) -> None:
    """Raises 429 ``rate_limit_exceeded`` when the key already runs its limit of requests."""
    if key.max_concurrent is not None and running >= key.max_concurrent:
        raise OrchestratorError(
            ErrorCode.RATE_LIMIT_EXCEEDED,
            f"This API key already has {running} requests running, its limit. Retry when one ends.",
            headers={**concurrency_headers(key.max_concurrent, running), "Retry-After": "1"},
        )


def rate_headers(key: KeyRecord, decision: LimitDecision, running: int) -> dict[str, str]:
    """Returns the ``x-ratelimit-*`` headers of an admission with ``running`` requests
    running before it.

    Raises:
        OrchestratorError: 429 ``rate_limit_exceeded`` (with them) when ``decision`` refused.
    """
    headers = decision.headers()
    if key.max_concurrent is not None:
        headers |= concurrency_headers(key.max_concurrent, running + 1)
    if not decision.allowed:
        which = "requests" if key.rpm is not None and decision.remaining_requests == 0 else "tokens"
        raise OrchestratorError(
            ErrorCode.RATE_LIMIT_EXCEEDED,
            f"Rate limit reached for this API key ({which} per minute). Retry after {headers['Retry-After']} s.",
            headers=headers,
        )
    return headers
