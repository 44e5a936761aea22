"""How a catalog is laid out in Serve applications: one per model, so that one model can be
changed without touching the others.

Serve gives every deployment of an application one code version, a hash of the
application's ``import_path`` and ``args``; any change to those restarts all of its
deployments. So each model is an application of its own (its ``args`` hold only its catalog
entry), the gateway is one (its ``args`` hold only the settings), and the router is one
(its ``args`` hold every entry, since it resolves names and prices requests):

* ``<name>``: the router, the HTTP ingress (``build_router_app``);
* ``<name>-gateway``: the gateway, unless the settings say ``open_access``
  (``build_gateway_app``);
* ``<name>-<deployment>``: each model's ModelServer (``build_model_app``), where
  ``<deployment>`` is :func:`orchestrator.catalog.deployment_name` of its display name. Its
  replicas also answer the OpenAI API for that model alone on the model's own route,
  :func:`model_route` (``/models/<model>``, under the router's prefix), without the router.

Changing model B's entry then rebuilds B's application and the router's (which Serve
rolls over, draining the old replica); model A's application and the gateway's keep their
replicas. Pure data here (no ray import): ``orchestrator serve``, ``orchestrator
serve-config``, the router, the autoscaling policy and ``orchestrator status`` use these
names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from orchestrator.catalog import ModelSpec

DEFAULT_APP = "orchestrator"
ROUTER_IMPORT = "orchestrator.serving:build_router_app"
GATEWAY_IMPORT = "orchestrator.serving:build_gateway_app"
MODEL_IMPORT = "orchestrator.serving:build_model_app"
GATEWAY_DEPLOYMENT = "gateway"


def model_app_name(instance: str, deployment: str) -> str:
    """The Serve application of one model of the router application ``instance``."""
    return f"{instance}-{deployment}"


def gateway_app_name(instance: str) -> str:
    """The Serve application of the gateway of the router application ``instance``."""
    return f"{instance}-{GATEWAY_DEPLOYMENT}"


def model_route(spec: ModelSpec, route_prefix: str = "/") -> str:
    """The route prefix of a model's own application: ``/models/`` and its deployment name
    without ``model-`` (the display name with anything but letters, digits, ``-`` and ``_``
    made ``-``), under the router's ``route_prefix``."""
    return f"{route_prefix.rstrip('/')}/models/{spec.deployment_name.removeprefix('model-')}"


def ingress_routes(specs: Iterable[ModelSpec], route_prefix: str = "/") -> dict[str, Any]:
    """What the ingress needs to send a generation request on the router's ``/v1`` straight
    to its model's application (``ORCH_INGRESS_ROUTES``, read by :mod:`orchestrator.ingress`):
    the router's route prefix, and every name of every model with its :func:`model_route`."""
    models = {name: model_route(spec, route_prefix) for spec in specs for name in spec.names}
    return {"router": route_prefix, "models": models}


def instance_of(application: str, deployment: str) -> str:
    """The router application that ``application`` belongs to: itself, unless it is the
    application of that one deployment (a model's or the gateway's, named as above)."""
    suffix = f"-{deployment}"
    return application.removesuffix(suffix) if application.endswith(suffix) and application != suffix else application


def entry(spec: ModelSpec) -> dict[str, Any]:
    """A catalog entry as it is written inline into an application's ``args``."""
    return spec.model_dump(mode="json", by_alias=True, exclude_defaults=True)


def applications(
    specs: Iterable[ModelSpec],
    settings: Mapping[str, Any],
    *,
    name: str = DEFAULT_APP,
    route_prefix: str = "/",
    local: bool = False,
) -> list[dict[str, Any]]:
    """Returns the Serve config ``applications`` for a catalog: the router, the gateway
    (without ``open_access``) and one per model. ``settings`` are the settings overrides
    every application gets (the same for all of them, so that a settings change reaches
    each); ``local`` is ``orchestrator serve``'s one-machine mode."""
    specs = list(specs)
    shared: dict[str, Any] = {"settings": dict(settings)}
    local_arg: dict[str, Any] = {"local": True} if local else {}
    apps: list[dict[str, Any]] = [
        {
            "name": name,
            "route_prefix": route_prefix,
            "import_path": ROUTER_IMPORT,
            "args": {"models": [entry(s) for s in specs], **shared, **local_arg},
        }
    ]
    if not settings.get("open_access"):
        apps.append(
            {
                "name": gateway_app_name(name),
                "route_prefix": None,
                "import_path": GATEWAY_IMPORT,
                "args": {**shared, **local_arg},
            }
        )
    apps.extend(
        {
            "name": model_app_name(name, spec.deployment_name),
            "route_prefix": model_route(spec, route_prefix),
            "import_path": MODEL_IMPORT,
            "args": {"model": entry(spec), **shared},
        }
        for spec in specs
    )
    return apps


def serve_config(
    specs: Iterable[ModelSpec],
    settings: Mapping[str, Any],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    proxy_location: str = "HeadOnly",
    name: str = DEFAULT_APP,
    local: bool = False,
) -> dict[str, Any]:
    """Returns a whole Serve deploy config (what ``serve deploy`` takes) for a catalog."""
    return {
        "proxy_location": proxy_location,
        "http_options": {"host": host, "port": port},
        "applications": applications(specs, settings, name=name, local=local),
    }
