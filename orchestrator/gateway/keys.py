"""API keys: generated with a recognisable prefix, stored only as a keyed hash.

Keys carry 256 bits of randomness, so a fast keyed hash (HMAC-SHA256 with a server-side
pepper) is the right tool, as for GitHub or Stripe tokens: a slow password hash would only
add latency to every request. Comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_PREFIX = "sk-orch-"


def generate_key() -> str:
    """Returns a new plaintext key (shown to its owner once, never stored)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str, pepper: bytes = b"") -> str:
    """Returns the hex HMAC-SHA256 of a key: what the store keeps and indexes."""
    return hmac.new(pepper, key.encode("utf-8"), hashlib.sha256).hexdigest()


def verify_key(key: str, stored_hash: str, pepper: bytes = b"") -> bool:
    """Returns whether ``key`` hashes to ``stored_hash``, in constant time."""
    return hmac.compare_digest(hash_key(key, pepper), stored_hash)


def key_hint(key: str) -> str:
    """Returns a displayable hint (prefix and last 4 characters); never the key."""
    return f"{KEY_PREFIX}...{key[-4:]}"
