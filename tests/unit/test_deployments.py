"""The shipped Serve configs parse as Serve configs and their args build valid settings."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from orchestrator import layout
from orchestrator.catalog import catalog_from_entries, load_catalog
from orchestrator.serving.builder import GatewayAppArgs, ModelAppArgs, RouterAppArgs
from orchestrator.settings import Settings

REPO = Path(__file__).resolve().parents[2]


SHIPPED = ["local-cpu.yaml", "gpu-cluster.yaml"]


@pytest.mark.parametrize("name", SHIPPED)
def test_serve_config_valid(name: str) -> None:
    """One application per model, each with only its own entry; the router's has them all."""
    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "deployments" / name).read_text()))
    router, *others = config.applications
    assert router.import_path == layout.ROUTER_IMPORT and router.route_prefix == "/"
    router_args = RouterAppArgs.model_validate(router.args)
    catalog = catalog_from_entries(router_args.models, origin=name)
    assert len(catalog) >= 2
    expected = {layout.gateway_app_name(router.name): layout.GATEWAY_IMPORT}
    expected |= {layout.model_app_name(router.name, s.deployment_name): layout.MODEL_IMPORT for s in catalog}
    assert {app.name: app.import_path for app in others} == expected
    routes = {layout.model_app_name(router.name, s.deployment_name): layout.model_route(s) for s in catalog}
    for app in others:
        assert app.route_prefix == routes.get(app.name) and app.args["settings"] == router_args.settings
        if app.import_path == layout.MODEL_IMPORT:
            (spec,) = catalog_from_entries([ModelAppArgs.model_validate(app.args).model], origin=name)
            assert app.name == layout.model_app_name(router.name, spec.deployment_name)
            assert spec == catalog.resolve(spec.name)
        else:
            GatewayAppArgs.model_validate(app.args)
    Settings(**router_args.settings)


@pytest.mark.engine  # serve-config checks engine_args against vLLM's
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_are_what_serve_config_writes(name: str, tmp_path: Path) -> None:
    """Each file says the command that wrote it; run again, it writes the same file (so a
    catalog change without regenerating the config fails here)."""
    from orchestrator.cli import GENERATED, main

    shipped = (REPO / "deployments" / name).read_text()
    first = shipped.splitlines()[0]
    prefix = GENERATED.split("{")[0]
    assert first.startswith(prefix)
    out = tmp_path / name
    assert main(["serve-config", *shlex.split(first.removeprefix(prefix)), "-o", str(out)]) == 0
    assert out.read_text() == shipped


def test_gpu_config_has_tensor_parallel_model() -> None:
    config = yaml.safe_load((REPO / "deployments" / "gpu-cluster.yaml").read_text())
    catalog = catalog_from_entries(config["applications"][0]["args"]["models"], origin="gpu-cluster.yaml")
    assert max(s.resources.tensor_parallel_size for s in catalog) > 1


def test_cluster_app_without_admin_key_refuses_to_build(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.serving.builder import UnsafeConfigError, build_app

    monkeypatch.delenv("ORCH_ADMIN_KEY", raising=False)
    with pytest.raises(UnsafeConfigError, match="admin key"):
        build_app({"catalog": [str(REPO / "catalog")]})


@pytest.mark.engine  # build_app checks engine_args against vLLM's
def test_app_with_admin_key_has_one_gateway_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.serving.builder import build_app

    monkeypatch.setenv("ORCH_ADMIN_KEY", "a-long-enough-admin-key")
    monkeypatch.setenv("ORCH_DATABASE_URL", "postgresql+psycopg://orch@db/orch")
    app = build_app({"catalog": [str(REPO / "catalog")], "settings": {"router_replicas": 2}})
    router = app._bound_deployment
    gateway = router.init_args[3]
    assert router._deployment_config.num_replicas == 2
    assert (
        gateway._bound_deployment.name == "gateway" and gateway._bound_deployment._deployment_config.num_replicas == 1
    )
    open_app = build_app({"catalog": [str(REPO / "catalog")], "settings": {"open_access": True}})
    assert open_app._bound_deployment.init_args[3] is None


def _init_args(app: Any) -> list[Any]:
    """Every bound deployment's init args in an app (the router and what it holds)."""
    found, todo = [], [app._bound_deployment]
    while todo:
        bound = todo.pop()
        for arg in [*bound.init_args, *bound.init_kwargs.values()]:
            if hasattr(arg, "_bound_deployment"):
                todo.append(arg._bound_deployment)
            elif isinstance(arg, dict) and arg and all(hasattr(v, "_bound_deployment") for v in arg.values()):
                todo.extend(v._bound_deployment for v in arg.values())
            else:
                found.append(arg)
    return found


@pytest.mark.engine  # build_app checks engine_args against vLLM's
def test_no_deployment_receives_a_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from orchestrator.serving.builder import build_app

    pepper = tmp_path / "pepper"
    pepper.write_text("pepper-from-a-mounted-secret\n")
    monkeypatch.setenv("ORCH_ADMIN_KEY", "admin-key-in-the-environment")
    monkeypatch.setenv("ORCH_KEY_PEPPER_FILE", str(pepper))
    monkeypatch.setenv("ORCH_DATABASE_URL", "postgresql+psycopg://orch:db-password@db/orch")
    app = build_app({"catalog": [str(REPO / "catalog")]})
    found = _init_args(app)
    settings = [arg for arg in found if isinstance(arg, dict) and "usage_flush_ms" in arg]
    assert len(settings) == len(load_catalog([REPO / "catalog"])) + 2  # every model, the gateway, the router
    args = json.dumps(found, default=str)
    for secret in ("admin-key-in-the-environment", "pepper-from-a-mounted-secret", "db-password"):
        assert secret not in args
    assert str(pepper) in args  # the file's name travels; each process reads it itself


@pytest.mark.engine  # build_app checks engine_args against vLLM's
def test_a_database_url_without_password_reaches_every_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.serving.builder import build_app

    monkeypatch.setenv("ORCH_ADMIN_KEY", "admin-key-in-the-environment")
    monkeypatch.delenv("ORCH_DATABASE_URL", raising=False)
    url = "postgresql+psycopg://orch@127.0.0.1:5432/orch"
    app = build_app({"catalog": [str(REPO / "catalog")], "settings": {"database_url": url}})
    settings = [arg for arg in _init_args(app) if isinstance(arg, dict) and "usage_flush_ms" in arg]
    # The gateway (and everyone else) must use the app's database, not its own default.
    assert settings and all(s["database_url"] == url for s in settings)


@pytest.mark.engine
@pytest.mark.parametrize(
    "settings",
    [
        {"admin_key": "a-long-enough-admin-key"},
        {"key_pepper": "pepper"},
        {"database_url": "postgresql+psycopg://orch:secret@db/orch"},
    ],
)
def test_secrets_written_in_args_are_refused(settings: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.serving.builder import UnsafeConfigError, build_app

    monkeypatch.setenv("ORCH_ADMIN_KEY", "a-long-enough-admin-key")
    monkeypatch.setenv("ORCH_DATABASE_URL", "postgresql+psycopg://orch@db/orch")
    with pytest.raises(UnsafeConfigError, match=f"ORCH_{next(iter(settings)).upper()}_FILE"):
        build_app({"catalog": [str(REPO / "catalog")], "settings": settings})
    # A database URL without a password (trust auth, a SQLite file) is not a secret.
    assert build_app({"catalog": [str(REPO / "catalog")], "settings": {"database_url": "postgresql://orch@db/o"}})


@pytest.mark.engine  # build_app checks engine_args against vLLM's
def test_a_cluster_deploy_on_sqlite_needs_allow_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.serving.builder import UnsafeConfigError, build_app

    monkeypatch.setenv("ORCH_ADMIN_KEY", "a-long-enough-admin-key")
    monkeypatch.delenv("ORCH_DATABASE_URL", raising=False)
    catalog = [str(REPO / "catalog")]
    with pytest.raises(UnsafeConfigError, match="SQLite"):
        build_app({"catalog": catalog})  # the default: a file in the cache folder
    with pytest.raises(UnsafeConfigError, match="allow_sqlite"):
        build_app({"catalog": catalog, "settings": {"database_url": "sqlite:////data/orch.db"}})
    assert build_app({"catalog": catalog, "settings": {"allow_sqlite": True}})
    assert build_app({"catalog": catalog, "local": True})  # orchestrator serve: one machine
    assert build_app({"catalog": catalog, "settings": {"open_access": True}})  # no gateway database


def test_secrets_come_from_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.settings import Settings

    (tmp_path / "admin").write_text("admin-key-from-a-file\n")
    monkeypatch.delenv("ORCH_ADMIN_KEY", raising=False)
    monkeypatch.setenv("ORCH_ADMIN_KEY_FILE", str(tmp_path / "admin"))
    assert Settings().admin_key == "admin-key-from-a-file"
    assert Settings(admin_key="given-directly-wins").admin_key == "given-directly-wins"
    monkeypatch.setenv("ORCH_ADMIN_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="admin_key_file: cannot read"):
        Settings()


def test_model_replicas_drop_secrets_from_their_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.serving.model_server import ModelServer
    from tests.fakes import FakeEngine

    monkeypatch.setenv("ORCH_ADMIN_KEY", "admin-key-in-the-environment")
    monkeypatch.setenv("ORCH_KEY_PEPPER", "pepper")
    spec = load_catalog([REPO / "catalog"]).specs[0]
    server = ModelServer(spec.model_dump(mode="json", by_alias=True), {}, engine_factory=lambda s, st: FakeEngine())
    assert (
        server.settings.admin_key is None and server.settings.key_pepper == "" and server.settings.database_url is None
    )


def test_the_journal_location_is_explicit_when_set(tmp_path: Path) -> None:
    assert Settings(usage_journal_dir=tmp_path / "j").journal_dir() == tmp_path / "j"
    one, two = Settings(database_url="sqlite:///a.db"), Settings(database_url="sqlite:///b.db")
    assert one.journal_dir() != two.journal_dir()  # by default, a folder per database
