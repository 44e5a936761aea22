"""Settings: the only place environment variables are read (prefix ``ORCH_``)."""

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SECRETS = ("admin_key", "key_pepper", "database_url")
"""Settings that are secrets: each can also come from a file (``ORCH_<NAME>_FILE``, e.g. a
mounted Kubernetes Secret), and none is passed to a deployment as an init argument (a
database URL is, when it carries no password: then it is no secret)."""


def _default_cache() -> Path:
    return Path.home() / ".cache" / "orchestrator"


def database_password(url: str) -> bool:
    """Returns whether a SQLAlchemy URL carries a password."""
    from sqlalchemy.engine import make_url

    return bool(make_url(url).password)


# The environment of every Ray process with fast ingress (`fast_ingress`, the Helm chart's
# `fastIngress`): Serve's HAProxy ingress and throughput-optimized mode, with user code on
# each replica's main event loop, as vLLM's own server runs (the mode's default, stated so
# that an operator sees it; docs/ARCHITECTURE.md has the measurement).
FAST_INGRESS_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # HAProxy's buffer, 64 KiB (Serve's default is 16 KiB): a generation request on /v1 whose
    # `model` lies past it goes through the router instead of straight to the model
    # (orchestrator/ingress.py).
    "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": "65536",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
}


class Settings(BaseSettings):
    """Process-wide settings. Every field can be set as ``ORCH_<FIELD>`` in the environment,
    or passed explicitly (Serve config ``args.settings``), which wins."""

    model_config = SettingsConfigDict(env_prefix="ORCH_", extra="forbid", frozen=True)

    catalog: list[str] = Field(default_factory=lambda: ["catalog"], description="Catalog files or folders.")
    host: str = Field(default="127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port.")
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description=(
            "`orchestrator serve` only: port of Ray's metrics export (Prometheus text at /metrics, every "
            "series: Serve's, vLLM's and the orchestrator's). Default: a free port, printed at start."
        ),
    )
    cache_dir: Path = Field(default_factory=_default_cache, description="Where prepared weights are cached.")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="Largest accepted request body.")
    keepalive_seconds: float = Field(default=15.0, gt=0, description="SSE keep-alive comment interval.")
    stream_batch_ms: float = Field(
        default=50.0,
        ge=0,
        description="After the first chunk, stream chunks are sent in batches at most this far apart.",
    )
    stream_batches_per_second: float = Field(
        default=400.0,
        gt=0,
        description=(
            "Stream batches a model replica sends per second before it coalesces chunks: with N streams in "
            "flight each stream's batches are N / this seconds apart (at most stream_batch_ms), so a lone "
            "stream gets every chunk at once."
        ),
    )
    router_replicas: int = Field(default=1, ge=1, description="Router deployment replicas.")
    router_max_ongoing_requests: int = Field(default=256, ge=1, description="Concurrent requests per router.")
    fast_ingress: bool = Field(
        default=True,
        description=(
            "`orchestrator serve` only: start Ray with Serve's HAProxy ingress and throughput-optimized "
            "mode, user code on each replica's main event loop (FAST_INGRESS_ENV; see docs/ARCHITECTURE.md). "
            "HAProxy runs through orchestrator-haproxy, which sends generation requests on /v1 straight to "
            "their model's application; on a loopback host it also moves HAProxy's stats and metrics ports to "
            "127.0.0.1 (on another host they listen on all interfaces)."
        ),
    )
    database_url: str | None = Field(
        default=None,
        repr=False,
        description=(
            "SQLAlchemy URL of the gateway database: keys, workspaces, usage. Default: a SQLite file "
            "`orchestrator.db` in the cache folder. Clusters: `postgresql+psycopg://user:pass@host/db`."
        ),
    )
    admin_key: str | None = Field(
        default=None,
        repr=False,
        min_length=16,
        description="Bearer token for `/admin/*` and for reading any generation. Required to deploy to a cluster.",
    )
    key_pepper: str = Field(
        default="", repr=False, description="Secret mixed into stored key hashes (HMAC-SHA256); changing it voids keys."
    )
    allow_sqlite: bool = Field(
        default=False,
        description=(
            "Let a cluster deploy keep the gateway database in SQLite (a file on whichever node the gateway "
            "runs: rescheduled elsewhere, it starts empty). For one-machine clusters; `orchestrator serve` "
            "needs no flag."
        ),
    )
    open_access: bool = Field(
        default=False,
        description=(
            "Serve without API keys: no auth, limits or metering. `orchestrator serve` turns it on when there is "
            "no admin key and no key in the database; a cluster deploy must set it explicitly."
        ),
    )
    usage_flush_ms: float = Field(default=200.0, gt=0, description="How often finished usage records are written.")
    key_cache_seconds: float = Field(
        default=2.0, ge=0, description="How long the gateway trusts a cached key row (CLI changes show up after this)."
    )
    auth_failures_per_address: int = Field(
        default=30,
        ge=0,
        description=(
            "Failed authentications (401) one client address may make per auth_failure_window_seconds; past "
            "them its requests get 429 authentication_throttled until the window ends (requests with a key "
            "this router saw succeed still pass). 0: no throttle."
        ),
    )
    auth_failure_window_seconds: float = Field(
        default=10.0, gt=0, description="The window of auth_failures_per_address, in seconds."
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description=(
            "Addresses or CIDR networks of proxies whose X-Forwarded-For is believed: a request's client "
            "address is its peer's, or, when the peer is one of these, the last X-Forwarded-For hop that is "
            "not. Default: none (the peer's address)."
        ),
    )
    ledger_channel: bool = Field(
        default=True,
        description=(
            "Callers on the gateway ledger's node call it over a Unix socket instead of a Ray actor call "
            "(much faster while the engine keeps the cores busy); false: every call is an actor call."
        ),
    )
    admin_key_file: Path | None = Field(default=None, description="File holding the admin key (read at start).")
    key_pepper_file: Path | None = Field(default=None, description="File holding the key pepper (read at start).")
    database_url_file: Path | None = Field(default=None, description="File holding the database URL (read at start).")
    stored_responses_bytes: int = Field(
        default=64 * 2**20,
        ge=0,
        description=(
            "Bound on one workspace's stored responses (Responses API, JSON bytes); past it a request "
            "with store: true gets 400 storage_limit_exceeded."
        ),
    )
    admission_ttl_seconds: float = Field(
        default=60.0,
        ge=1,
        description=(
            "Routers renew the holds of their running requests four times in this period. When a router is "
            "not heard from for this long (it died), the gateway releases its requests' holds and records "
            "each as lost (500 internal_error, nothing billed)."
        ),
    )
    usage_journal_dir: Path | None = Field(
        default=None,
        description=(
            "Folder of the gateway's usage journal (records not yet in the database). Default: a folder per "
            "database under the cache folder. Give the gateway a persistent volume here on clusters: the ledger "
            "that next holds the database's fence replays what a crashed one left in it."
        ),
    )
    gateway_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description=(
            "How long a router waits for one gateway call (authentication, admission, settlement); past it the "
            "request gets 503 service_unavailable. An admission that completes after its request gave up is "
            "settled at once (nothing billed), so it holds nothing."
        ),
    )
    db_outage_grace_seconds: float = Field(
        default=300.0,
        ge=0,
        description=(
            "While the gateway database is unreachable, how long keys seen recently keep being admitted from "
            "cached rows; past it (and for keys not cached) requests get 503 service_unavailable."
        ),
    )
    kv_cache_gb: int = Field(
        default=1,
        ge=1,
        description=(
            "CPU engines only: KV cache per engine in whole GiB (VLLM_CPU_KVCACHE_SPACE), for entries whose "
            "engine_args do not set kv_cache_memory_bytes."
        ),
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            ipaddress.ip_network(network, strict=False)  # ValueError names the bad entry
        return value

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, data: Any) -> Any:
        """Fills each secret not given directly from its ``*_file`` (surrounding whitespace,
        such as the trailing newline of a mounted Secret, dropped)."""
        if not isinstance(data, dict):
            return data
        for name in SECRETS:
            path = data.get(f"{name}_file")
            if path and data.get(name) is None:
                try:
                    data[name] = Path(path).expanduser().read_text(encoding="utf-8").strip()
                except OSError as exc:
                    raise ValueError(f"{name}_file: cannot read {path}: {exc.strerror}") from None
        return data

    def shareable(self) -> dict[str, Any]:
        """Returns the settings as JSON-ready data without the secrets (files named, not read):
        what deployments receive as init arguments. Each process reads its secrets itself. A
        database URL without a password (a SQLite file, trust or certificate auth) is no
        secret and is kept, so every process uses the database the app was built with."""
        data = self.model_dump(mode="json", exclude=set(SECRETS))
        if self.database_url is not None and not database_password(self.database_url):
            data["database_url"] = self.database_url
        return data

    def without_secrets(self) -> Settings:
        """Returns these settings with every secret at its default (unset), for processes
        that need none (model replicas), whatever their environment holds."""
        return self.model_copy(update={name: type(self).model_fields[name].default for name in SECRETS})

    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the cache folder."""
        return self.database_url or f"sqlite:///{self.cache_dir.expanduser() / 'orchestrator.db'}"

    def journal_dir(self) -> Path:
        """Where the gateway journals finished usage records before they reach the database:
        ``usage_journal_dir``, else a folder per database under the cache folder (so two
        deployments never replay each other's records)."""
        if self.usage_journal_dir is not None:
            return self.usage_journal_dir.expanduser()
        digest = hashlib.sha256(self.resolved_database_url().encode()).hexdigest()[:16]
        return self.cache_dir.expanduser() / "usage-journal" / digest
