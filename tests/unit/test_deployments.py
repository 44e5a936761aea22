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
