"""The shipped Serve configs parse as Serve configs and their args build valid settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from orchestrator.catalog import load_catalog
from orchestrator.serving.builder import AppArgs, resolve_paths
from orchestrator.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["local-cpu.yaml", "gpu-cluster.yaml"])
def test_serve_config_valid(name: str) -> None:
    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "deployments" / name).read_text()))
    (app,) = config.applications
    assert app.import_path == "orchestrator.serving:build_app"
    args = AppArgs.model_validate(app.args)
    Settings(**args.settings)
    assert args.catalog is not None
    assert len(load_catalog(resolve_paths(args.catalog))) >= 2


def test_gpu_config_has_tensor_parallel_model() -> None:
    config = yaml.safe_load((REPO / "deployments" / "gpu-cluster.yaml").read_text())
    catalog = load_catalog(resolve_paths(config["applications"][0]["args"]["catalog"]))
    assert max(s.resources.tensor_parallel_size for s in catalog) > 1


def test_cluster_app_without_admin_key_refuses_to_build(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.serving.builder import UnsafeConfigError, build_app

    monkeypatch.delenv("ORCH_ADMIN_KEY", raising=False)
    with pytest.raises(UnsafeConfigError, match="admin key"):
        build_app({"catalog": [str(REPO / "catalog")]})


def test_app_with_admin_key_has_one_gateway_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.serving.builder import build_app

    monkeypatch.setenv("ORCH_ADMIN_KEY", "a-long-enough-admin-key")
    app = build_app({"catalog": [str(REPO / "catalog")], "settings": {"router_replicas": 2}})
    router = app._bound_deployment
    gateway = router.init_args[3]
    assert router._deployment_config.num_replicas == 2
    assert (
        gateway._bound_deployment.name == "gateway" and gateway._bound_deployment._deployment_config.num_replicas == 1
    )
    open_app = build_app({"catalog": [str(REPO / "catalog")], "settings": {"open_access": True}})
    assert open_app._bound_deployment.init_args[3] is None
