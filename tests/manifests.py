"""Validation of rendered Kubernetes manifests, offline, and what a NetworkPolicy lets in.

Built-in kinds are checked with kubernetes-validate's strict schemas (unknown fields are
errors). Custom resources are checked against their CRD's ``openAPIV3Schema``, read from the
CRD files in ``ORCH_CRDS_DIR``, ``<repo>/../shared/crds`` or ``/work/shared/crds`` (data kept
outside the project). The OpenAPI flavour is turned into JSON Schema the way the API server
reads it: ``nullable`` allows null, an object with ``x-kubernetes-preserve-unknown-fields``
accepts any keys, and any other object with ``properties`` accepts only those (the API
server would silently drop the rest).
"""

from __future__ import annotations

import functools
import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[1]
CRD_FILES = ("ray.io_rayservices.yaml", "monitoring.coreos.com_servicemonitors.yaml")
SHARED_CRDS = Path("/work/shared/crds")


def crds_dir() -> Path:
    """The folder of the CRD files.

    Raises:
        FileNotFoundError: none of those folders holds them.
    """
    if os.environ.get("ORCH_CRDS_DIR"):
        folder = Path(os.environ["ORCH_CRDS_DIR"])
    else:
        # Beside the clone; else this machine's shared folder (a clone made elsewhere).
        candidates = [REPO.parent / "shared" / "crds", SHARED_CRDS]
        folder = next((c for c in candidates if (c / CRD_FILES[0]).is_file()), candidates[0])
    missing = [name for name in CRD_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CRD schemas not found in {folder} ({', '.join(missing)}): set ORCH_CRDS_DIR to a folder holding them "
            "(KubeRay's ray.io_rayservices.yaml, prometheus-operator's monitoring.coreos.com_servicemonitors.yaml)"
        )
    return folder


def openapi_to_jsonschema(node: Any) -> Any:
    """Returns a CRD's OpenAPI v3 schema as a JSON Schema (see the module docstring)."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {
        key: openapi_to_jsonschema(value) if key not in ("properties", "enum", "default", "example") else value
        for key, value in node.items()
        if not key.startswith("x-kubernetes-") and key != "nullable"
    }
    if "properties" in node:
        out["properties"] = {name: openapi_to_jsonschema(sub) for name, sub in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable"):
        if "type" in out:
            types = out["type"] if isinstance(out["type"], list) else [out["type"]]
            out["type"] = [*types, "null"]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """A validator per (apiVersion, kind) served by the CRDs."""
    validators = {}
    for name in CRD_FILES:
        # The RayService CRD is 1 MB of YAML: libyaml's loader reads it several times faster.
        crd = yaml.load((crds_dir() / name).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
            jsonschema.Draft7Validator.check_schema(schema)
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def custom_resource_errors(doc: dict[str, Any]) -> list[str]:
    """Every schema error of a custom resource, as "path: message"."""
    validator = crd_validators()[(doc["apiVersion"], doc["kind"])]
    return [
        f"{'.'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


def validate(doc: dict[str, Any], kube_versions: Iterable[str]) -> None:
    """Validates one manifest: a custom resource against its CRD, any other kind with
    kubernetes-validate's strict schema for each Kubernetes version.

    Raises:
        AssertionError: the manifest is invalid, or no schema knows its kind.
    """
    if (doc["apiVersion"], doc["kind"]) in crd_validators():
        errors = custom_resource_errors(doc)
        assert not errors, f"{doc['kind']} {doc['metadata']['name']}:\n" + "\n".join(errors)
        return
    for version in kube_versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            raise AssertionError(f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {version}): {error}") from None
        except kubernetes_validate.SchemaNotFoundError as error:
            raise AssertionError(f"no schema for {doc['apiVersion']} {doc['kind']}: {error}") from None


@dataclass(frozen=True)
class Peer:
    """A source of traffic: a pod (its namespace, the namespace's labels and its own) or, with
    ``pod_labels`` None, an address outside the cluster."""

    ip: str
    namespace: str = ""
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    pod_labels: Mapping[str, str] | None = None


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A LabelSelector of ``matchLabels`` only (an empty one selects everything)."""
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is evaluated here: {selector}"
    return dict(selector.get("matchLabels") or {}).items() <= dict(labels).items()


def _peer_matches(rule_peer: Mapping[str, Any], peer: Peer, policy_namespace: str) -> bool:
    """A NetworkPolicyPeer as Kubernetes reads it: an ipBlock matches addresses (here: outside
    the cluster only); a podSelector alone, pods of the policy's namespace; a namespaceSelector,
    pods of the namespaces it selects (and of those, the podSelector's, if both are given)."""
    if "ipBlock" in rule_peer:
        block = rule_peer["ipBlock"]
        address = ipaddress.ip_address(peer.ip)
        inside = address in ipaddress.ip_network(block["cidr"])
        return (
            peer.pod_labels is None
            and inside
            and not any(address in ipaddress.ip_network(e) for e in block.get("except", []))
        )
    if peer.pod_labels is None:
        return False
    if "namespaceSelector" in rule_peer:
        if not _selects(rule_peer["namespaceSelector"], peer.namespace_labels):
            return False
    elif peer.namespace != policy_namespace:
        return False
    return _selects(rule_peer.get("podSelector", {}), peer.pod_labels)


def network_policy_allows(policy: Mapping[str, Any], namespace: str, peer: Peer, port: int) -> bool:
    """Whether an Ingress NetworkPolicy in ``namespace`` lets ``peer`` reach TCP ``port`` of a pod it
    selects: some rule whose ports (none: every port) hold the port and whose peers (none: every
    source) hold the peer. Named ports and port ranges are not evaluated (they fail the check)."""
    spec = policy["spec"]
    assert spec.get("policyTypes") == ["Ingress"], spec.get("policyTypes")
    for rule in spec.get("ingress") or []:
        ports = rule.get("ports") or []
        for item in ports:
            assert isinstance(item["port"], int) and "endPort" not in item, f"not evaluated here: {item}"
        if ports and not any(p["port"] == port and p.get("protocol", "TCP") == "TCP" for p in ports):
            continue
        peers = rule.get("from") or []
        if not peers or any(_peer_matches(p, peer, namespace) for p in peers):
            return True
    return False
