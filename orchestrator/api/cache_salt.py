"""Which cached prompt prefixes a request may reuse.

vLLM reuses the KV cache of a prompt prefix it has computed before, which makes a repeated
prefix come back sooner: a timing signal that tells one tenant what another has sent. A
request's ``cache_salt`` goes into the hash of every cached block, so requests with different
salts never share blocks. The router sets it from the request's workspace on every route and
dialect; a salt the client sends is combined with the workspace, never used alone, so it can
split a workspace's cache further but never reach into another's. A catalog entry with
``shared_prefix_cache: true`` (a single-tenant deployment) keeps the client's salt as sent.
Open mode has no workspaces: the client's salt, if any, is passed through.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

SALT_FIELD = "cache_salt"


def cache_salt(workspace_id: str | None, client_salt: str | None, *, shared: bool = False) -> str | None:
    """The salt the engine gets: a digest of the workspace and the client's salt, or the
    client's salt as sent when the cache is shared or there is no workspace."""
    if shared or workspace_id is None:
        return client_salt
    material = json.dumps([workspace_id, client_salt], separators=(",", ":"))
    return "ws-" + hashlib.sha256(material.encode()).hexdigest()


def salted(body: dict[str, Any], workspace_id: str | None, *, shared: bool = False) -> dict[str, Any]:
    """Returns ``body`` with its ``cache_salt`` set for ``workspace_id`` (a new dict)."""
    salt = cache_salt(workspace_id, body.get(SALT_FIELD), shared=shared)
    rest = {name: value for name, value in body.items() if name != SALT_FIELD}
    return rest if salt is None else {**rest, SALT_FIELD: salt}
