"""Gateway logic in pure Python (no ray, no fastapi): keys, limits, pricing.

Collaborators (clock, store) are injected so every rule is unit-testable.
"""

from orchestrator.gateway.keys import KEY_PREFIX, generate_key, hash_key, key_hint, verify_key
from orchestrator.gateway.limiter import LimitDecision, RateLimiter
from orchestrator.gateway.pricing import request_cost

__all__ = [
    "KEY_PREFIX",
    "LimitDecision",
    "RateLimiter",
    "generate_key",
    "hash_key",
    "key_hint",
    "request_cost",
    "verify_key",
]
