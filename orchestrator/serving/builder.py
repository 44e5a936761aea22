"""The app builder: the one place where ``serve.deployment`` is applied.

``orchestrator.serving:build_app`` is what Serve configs import; its ``args`` are
:class:`AppArgs`. The classes it deploys stay plain Python.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from ray.serve.deployment import Deployment

from orchestrator.catalog import Catalog, ModelSpec, catalog_from_entries, load_catalog
from orchestrator.serving.gateway_server import GatewayServer
from orchestrator.serving.model_route import ModelRouteDeployment
from orchestrator.serving.model_server import ServedModelServer
from orchestrator.serving.options import (
    gateway_deployment_options,
    model_deployment_options,
    router_deployment_options,
)
from orchestrator.serving.router import RouterDeployment
from orchestrator.settings import Settings, database_password

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class AppArgs(BaseModel):
    """Serve config ``args`` for :func:`build_app`."""

    model_config = ConfigDict(extra="forbid")

    catalog: list[str] | None = Field(
        default=None, description="Catalog files or folders (default: settings, i.e. ORCH_CATALOG or `catalog`)."
    )
    settings: dict[str, Any] = Field(default_factory=dict, description="Settings overrides (see Settings).")
    local: bool = Field(
        default=False,
        description="Set by `orchestrator serve` on one machine: API keys may be used without an admin key.",
    )


class UnsafeConfigError(ValueError):
    """The app would serve a cluster without any admin credentials."""


def _refuse_plain_secrets(overrides: dict[str, Any]) -> None:
    """Raises UnsafeConfigError for a secret written into a Serve config's ``args``: the admin
    key, the pepper, or a database URL with a password. Their ``*_file`` settings (a path)
    or ``ORCH_*`` environment variables are the way to give them."""
    found = [name for name in ("admin_key", "key_pepper") if overrides.get(name)]
    url = overrides.get("database_url")
    if url and database_password(str(url)):
        found.append("database_url")
    if found:
        raise UnsafeConfigError(
            f"Secrets must not be written in the app's args ({', '.join(found)}): set them in the environment "
            f"(ORCH_{found[0].upper()}) or give a file (settings.{found[0]}_file or ORCH_{found[0].upper()}_FILE)."
        )


def resolve_paths(paths: list[str]) -> list[str]:
    """Resolves relative catalog paths against the working directory, else the project
    root (Serve builds apps in a worker whose working directory is not the checkout)."""
    out = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.is_absolute() and not p.exists() and (PROJECT_ROOT / p).exists():
            p = PROJECT_ROOT / p
        out.append(str(p.resolve()))
    return out


def load_validated_catalog(paths: list[str]) -> Catalog:
    """Loads the catalog and checks ``engine_args`` against the installed vLLM.

    Raises:
        CatalogError: every problem, with file and field.
    """
    from orchestrator.vllm_internals import engine_arg_names

    return load_catalog(resolve_paths(paths), engine_arg_names=engine_arg_names())


def _checked_settings(overrides: dict[str, Any], *, local: bool) -> Settings:
    """Settings for an application that holds or reaches the gateway, from its
    ``args.settings``, refusing an unsafe cluster."""
    _refuse_plain_secrets(overrides)
    settings = Settings(**overrides)
    if settings.admin_key is None and not settings.open_access and not local:
        raise UnsafeConfigError(
            "Refusing to deploy without an admin key: set ORCH_ADMIN_KEY (or ORCH_ADMIN_KEY_FILE) to a secret of "
            "16+ characters, or set open_access: true to serve without API keys."
        )
    cluster_gateway = not settings.open_access and not local
    if cluster_gateway and not settings.allow_sqlite and settings.resolved_database_url().startswith("sqlite"):
        raise UnsafeConfigError(
            "Refusing to keep a cluster's gateway database in SQLite (a file on one node: keys and balances "
            "would vanish if the gateway moved): set ORCH_DATABASE_URL (or ORCH_DATABASE_URL_FILE) to "
            "PostgreSQL, or set allow_sqlite: true for a one-machine cluster."
        )
    return settings


def _model_server(spec: ModelSpec, settings: Settings, *, routed: bool = False) -> Application:
    # `routed`: the ingress of the model's own application, answering on its route.
    served = ModelRouteDeployment if routed else ServedModelServer
    deployment: Deployment = serve.deployment(served)  # type: ignore[assignment]
    # No secret travels as an init argument (Serve shows those in its config and state API).
    return deployment.options(**model_deployment_options(spec, settings)).bind(
        spec.model_dump(mode="json", by_alias=True), settings.shareable()
    )


def _gateway(settings: Settings) -> Application:
    deployment: Deployment = serve.deployment(GatewayServer)  # type: ignore[assignment]
    return deployment.options(**gateway_deployment_options(settings)).bind(settings.shareable())


def _router(catalog: Catalog, settings: Settings, models: Any, gateway: Any) -> Application:
    router: Deployment = serve.deployment(RouterDeployment)  # type: ignore[assignment]
    specs = [spec.model_dump(mode="json", by_alias=True) for spec in catalog]
    return router.options(**router_deployment_options(settings)).bind(specs, settings.shareable(), models, gateway)


def build_app(args: AppArgs | dict[str, Any] | None = None) -> Application:
    """Builds the whole catalog as one Serve application: one ModelServer deployment per
    catalog model, the gateway (without open access) and the Router ingress holding a
    handle to each. Serve restarts every deployment of it on any change to its args; the
    layout of :mod:`orchestrator.layout` (one application per model) does not.

    Raises:
        CatalogError: the catalog is invalid (nothing is deployed).
        UnsafeConfigError: no admin key, and open access was not asked for explicitly; a
            secret is written in ``args.settings``; or a gateway database in SQLite without
            ``allow_sqlite``.
    """
    args = AppArgs.model_validate(args or {}) if not isinstance(args, AppArgs) else args
    overrides = dict(args.settings)
    if args.catalog is not None:
        overrides["catalog"] = args.catalog
    settings = _checked_settings(overrides, local=args.local)
    catalog = load_validated_catalog(settings.catalog)
    models = {spec.name: _model_server(spec, settings) for spec in catalog}
    gateway = None if settings.open_access else _gateway(settings)
    return _router(catalog, settings, models, gateway)


class RouterAppArgs(BaseModel):
    """Serve config ``args`` for :func:`build_router_app` (see :mod:`orchestrator.layout`)."""

    model_config = ConfigDict(extra="forbid")

    models: list[dict[str, Any]] = Field(min_length=1, description="Catalog entries, inline.")
    settings: dict[str, Any] = Field(default_factory=dict, description="Settings overrides (see Settings).")
    local: bool = Field(default=False, description="As AppArgs.local.")


class ModelAppArgs(BaseModel):
    """Serve config ``args`` for :func:`build_model_app`."""

    model_config = ConfigDict(extra="forbid")

    model: dict[str, Any] = Field(description="One catalog entry, inline.")
    settings: dict[str, Any] = Field(default_factory=dict, description="Settings overrides (see Settings).")


class GatewayAppArgs(BaseModel):
    """Serve config ``args`` for :func:`build_gateway_app`."""

    model_config = ConfigDict(extra="forbid")

    settings: dict[str, Any] = Field(default_factory=dict, description="Settings overrides (see Settings).")
    local: bool = Field(default=False, description="As AppArgs.local.")


def build_router_app(args: RouterAppArgs | dict[str, Any]) -> Application:
    """Builds the router application of :mod:`orchestrator.layout`: the Router ingress alone,
    reaching each model and the gateway in their own applications.

    Raises:
        CatalogError: the entries are invalid.
        UnsafeConfigError: as :func:`build_app`.
    """
    args = RouterAppArgs.model_validate(args) if not isinstance(args, RouterAppArgs) else args
    settings = _checked_settings(args.settings, local=args.local)
    catalog = catalog_from_entries(args.models, origin="args.models", engine_arg_names=None)
    return _router(catalog, settings, None, None)


def build_model_app(args: ModelAppArgs | dict[str, Any]) -> Application:
    """Builds one model's application of :mod:`orchestrator.layout`: its ModelServer, which
    also answers on the model's own route (:mod:`orchestrator.serving.model_route`).

    Raises:
        CatalogError: the entry is invalid (``engine_args`` are checked against vLLM's).
        UnsafeConfigError: a secret is written in ``args.settings``.
    """
    from orchestrator.vllm_internals import engine_arg_names

    args = ModelAppArgs.model_validate(args) if not isinstance(args, ModelAppArgs) else args
    _refuse_plain_secrets(args.settings)  # a model needs no admin key or database
    settings = Settings(**args.settings)
    (spec,) = catalog_from_entries([args.model], origin="args.model", engine_arg_names=engine_arg_names())
    return _model_server(spec, settings, routed=True)


def build_gateway_app(args: GatewayAppArgs | dict[str, Any] | None = None) -> Application:
    """Builds the gateway's application of :mod:`orchestrator.layout`.

    Raises:
        UnsafeConfigError: as :func:`build_app`.
    """
    args = GatewayAppArgs.model_validate(args or {}) if not isinstance(args, GatewayAppArgs) else args
    return _gateway(_checked_settings(args.settings, local=args.local))
