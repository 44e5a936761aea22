"""The gateway protocols: what the HTTP edge needs from the ledger.

:class:`~orchestrator.gateway.ledger.Ledger` implements both in-process (unit tests, and
the ledger actor); the serving layer forwards them to that actor; :class:`OpenGateway` is
the request path of the keyless mode for local use, which has no administration.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any, Protocol

from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.gateway.adapters import AdapterEntry
from orchestrator.gateway.records import Admission, CreatedKey, KeyInfo, KeyLimits, UsageRecord, Workspace


class RequestGateway(Protocol):
    """What every request needs: who is calling, may it run, what did it cost, and the
    lookup of a finished request (see ``Ledger`` for the contract)."""

    async def authenticate(self, api_key: str | None) -> KeyInfo | None: ...

    async def admit(
        self,
        api_key: str | None,
        model_names: Sequence[str],
        tokens: int,
        request_id: str,
        *,
        cost: Decimal = ...,
        holder: str | None = ...,
    ) -> Admission: ...

    async def renew(self, holder: str) -> None: ...

    async def settle(self, admission: Admission, record: UsageRecord) -> bool: ...

    async def generation(self, generation_id: str, api_key: str | None, *, admin: bool = False) -> UsageRecord: ...

    async def response_context(
        self, api_key: str | None, previous_id: str | None, store: bool
    ) -> list[dict[str, Any]]: ...

    async def keep_response(self, api_key: str | None, body: dict[str, Any], history: list[dict[str, Any]]) -> None: ...

    async def stored_response(self, api_key: str | None, response_id: str) -> dict[str, Any]: ...

    async def forget_response(self, api_key: str | None, response_id: str) -> None: ...


class Gateway(RequestGateway, Protocol):
    """The request path plus administration: keys, workspaces, usage reports, and the LoRA
    adapters added at run time (for model replicas, which hold no database URL)."""

    async def usage_report(self, **filters: Any) -> list[dict[str, Any]]: ...

    async def create_key(self, limits: KeyLimits, workspace: str = "default") -> CreatedKey: ...

    async def list_keys(self) -> list[KeyInfo]: ...

    async def get_key(self, key_id: str) -> KeyInfo: ...

    async def update_key(
        self,
        key_id: str,
        limits: KeyLimits,
        clear: frozenset[str] = frozenset(),
        add_credits: Decimal | None = None,
    ) -> KeyInfo: ...

    async def revoke_key(self, key_id: str) -> KeyInfo: ...

    async def list_workspaces(self) -> list[Workspace]: ...

    async def set_workspace_enabled(self, workspace_id: str, enabled: bool) -> Workspace: ...

    async def runtime_adapters(self) -> list[AdapterEntry]: ...


ZERO = Decimal(0)


def _methods(*protocols: type) -> frozenset[str]:
    return frozenset(name for p in protocols for name, value in vars(p).items() if callable(value) and name[0] != "_")


GATEWAY_METHODS = _methods(RequestGateway, Gateway)
"""Every method a remote caller may run on a ledger: the request path and administration
(not its lifecycle: ``start``, ``stop``, ``flush``)."""
REQUEST_METHODS = _methods(RequestGateway)
"""The request path's methods (admission, settlement, renewal, lookup)."""


def gateway_timed_out(seconds: float) -> OrchestratorError:
    """The error of a gateway call past its deadline: 503 with ``Retry-After``, as for a
    gateway that is restarting (an infrastructure fault; the client may retry)."""
    return OrchestratorError(
        ErrorCode.SERVICE_UNAVAILABLE,
        f"The gateway did not answer within {seconds:g} s; retry the request.",
        headers={"Retry-After": "1"},
    )


class OpenGateway:
    """Open mode: everyone is let in anonymously, without limits, and nothing is recorded."""

    async def authenticate(self, api_key: str | None) -> KeyInfo | None:
        return None

    async def admit(
        self,
        api_key: str | None,
        model_names: Sequence[str],
        tokens: int,
        request_id: str,
        *,
        cost: Decimal = ZERO,
        holder: str | None = None,
    ) -> Admission:
        return Admission(request_id=request_id)

    async def renew(self, holder: str) -> None:
        return None

    async def settle(self, admission: Admission, record: UsageRecord) -> bool:
        return False

    async def generation(self, generation_id: str, api_key: str | None, *, admin: bool = False) -> UsageRecord:
        raise OrchestratorError(
            ErrorCode.NOT_FOUND, "This server runs without API keys (open mode): nothing is recorded.", param="id"
        )

    async def response_context(self, api_key: str | None, previous_id: str | None, store: bool) -> list[dict[str, Any]]:
        if previous_id is not None:
            raise _keeps_nothing("previous_response_id")
        return []

    async def keep_response(self, api_key: str | None, body: dict[str, Any], history: list[dict[str, Any]]) -> None:
        return None

    async def stored_response(self, api_key: str | None, response_id: str) -> dict[str, Any]:
        raise _keeps_nothing("response_id", ErrorCode.NOT_FOUND)

    async def forget_response(self, api_key: str | None, response_id: str) -> None:
        raise _keeps_nothing("response_id", ErrorCode.NOT_FOUND)


def _keeps_nothing(param: str, code: ErrorCode = ErrorCode.INVALID_REQUEST) -> OrchestratorError:
    return OrchestratorError(code, "This server runs without API keys (open mode): no response is stored.", param=param)
