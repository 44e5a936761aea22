"""Placement across Ray nodes: a second node joins the session's cluster on this machine
(``ray start --address``, on 127.0.0.1, with a node label of its own), and a model pinned
to that label runs there while the others stay on the head. Ray's state API says where each
replica runs. Then the second node's processes are killed: the head's model goes on
serving without a failure, the pinned model answers with a stable error (never a hang or a
500), and it serves again once the node is back.

The second node has one CPU, which the pinned model takes (``cpus: 1``), so no other
replica lands there; the application is deployed before the node joins, so its router and
its head model are already placed on the head."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from orchestrator.catalog import catalog_from_entries
from orchestrator.engine.weights import build_tiny_llama
from orchestrator.layout import applications
from tests.integration.conftest import (
    Deployment,
    _run,
    _wait_ready,
    answers_within,
    ask,
    free_port,
    steady_load,
    tiny_entry,
)

pytestmark = pytest.mark.integration

NAME = "placement"  # the router's application; route /placement, open mode
LABEL = {"orch-test-zone": "two"}
# Where each live Serve replica whose actor name contains argv[2] runs (Ray's state API).
_PLACEMENT = """
import json, sys, ray
from ray.util.state import list_actors, list_nodes
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
nodes = {n.node_id: n for n in list_nodes(filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)}
found = {}
for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=10000, raise_on_missing_output=False):
    if (actor.name or "").startswith("SERVE_REPLICA") and sys.argv[2] in actor.name:
        node = nodes.get(actor.node_id)
        found[actor.name] = {
            "node_id": actor.node_id,
            "head": bool(node and node.is_head_node),
            "labels": dict(node.labels) if node else {},
        }
print(json.dumps(found))
"""


def _placement(deployment: Deployment, fragment: str) -> dict[str, dict[str, Any]]:
    done = _run(deployment.env, sys.executable, "-c", _PLACEMENT, deployment.gcs_address, fragment, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found: dict[str, dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


# `ray start` for a second node on this machine, everything on loopback. The session's
# cluster keeps Ray's servers on 127.0.0.1 with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and under
# that flag `ray start --address` refuses to add a node; without it, Ray resolves 127.0.0.1
# to the machine's public address, where the GCS does not listen. So this runs Ray's own
# CLI with the multi-node check passed and loopback addresses kept as given.
_RAY_START = """
import sys
from ray._private import ray_constants, services
ray_constants.ENABLE_RAY_CLUSTER = True
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv = ["ray", *sys.argv[1:]]
main()
"""


# The ids of the live nodes that carry the label argv[2] (key=value).
_LABELLED_NODES = """
import json, sys, ray
from ray.util.state import list_nodes
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
key, value = sys.argv[2].split("=")
alive = list_nodes(filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
print(json.dumps([n.node_id for n in alive if n.labels.get(key) == value]))
"""


def _labelled_nodes(deployment: Deployment, labels: str) -> set[str] | None:
    done = _run(deployment.env, sys.executable, "-c", _LABELLED_NODES, deployment.gcs_address, labels)
    if done.returncode != 0 or not done.stdout.strip():
        return None  # the state API did not answer this time
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def start_node(deployment: Deployment, log: Path, attempts: int = 2) -> subprocess.Popen[str]:
    """Starts the second node and returns once Ray lists it alive: a labelled node that was
    not alive before (a killed one may still be listed for a while). Its output goes to
    ``log``. A start that fails (Ray's own start-up deadlines, on a busy machine) is tried
    again."""
    for attempt in range(1, attempts + 1):
        try:
            return _start_node(deployment, log)
        except RuntimeError:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _start_node(deployment: Deployment, log: Path) -> subprocess.Popen[str]:
    labels = ",".join(f"{k}={v}" for k, v in LABEL.items())
    before = _labelled_nodes(deployment, labels)
    assert before is not None, "Ray's state API did not answer"
    with log.open("a") as out:
        node = subprocess.Popen(
            [
                sys.executable, "-c", _RAY_START, "start", "--block", f"--address={deployment.gcs_address}",
                "--node-ip-address=127.0.0.1", "--num-cpus=1", f"--labels={labels}",
                # Ports of its own: the head's agent holds the default ones on this machine.
                f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", "--min-worker-port=20000", "--max-worker-port=20999",
                "--disable-usage-stats",
            ],
            env=deployment.env, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if node.poll() is not None:
            kill_tree(node)  # what it started and left behind
            raise RuntimeError(f"the second node exited ({node.returncode}):\n{log.read_text()[-3000:]}")
        alive = _labelled_nodes(deployment, labels)
        if alive is not None and alive - before:
            return node
        time.sleep(2)
    kill_tree(node)
    raise TimeoutError(f"the second node did not join within 120 s:\n{log.read_text()[-3000:]}")


def kill_tree(node: subprocess.Popen[str]) -> None:
    """Kills the node's processes at once (SIGKILL), as a machine that died would: the
    process tree under ``node``, and its process group (what outlived its parent)."""
    try:
        root = psutil.Process(node.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(node.pid, signal.SIGKILL)  # started with a session, and so a group, of its own
    psutil.wait_procs(tree, timeout=30)
    node.wait(timeout=30)


def test_a_model_pinned_to_a_node_runs_there_and_survives_losing_it(
    deployment: Deployment, tmp_path_factory: pytest.TempPathFactory
) -> None:
    weights = build_tiny_llama(tmp_path_factory.mktemp("placement") / "tiny", seed=9)
    on_head = tiny_entry("tiny-p1", "p1", weights)
    pinned = tiny_entry(
        "tiny-p2", "p2", weights,
        resources={"device": "cpu", "cpus": 1, "node_labels": LABEL},
        # Without a replica, a request waits 5 s for one, then gets 503 model_unavailable.
        autoscaling={"min_replicas": 1, "max_replicas": 1, "cold_start_timeout_s": 5},
        overload={"request_timeout_s": 20, "stream_idle_timeout_s": 20},
    )  # fmt: skip
    base = copy.deepcopy(deployment.config)
    config = copy.deepcopy(base)
    settings = {"open_access": True, "keepalive_seconds": 2, "router_replicas": 1}
    specs = catalog_from_entries([on_head, pinned], origin="test")
    config["applications"] += applications(specs, settings, name=NAME, route_prefix=f"/{NAME}")
    base_url = f"{deployment.base_url}/{NAME}"
    log = tmp_path_factory.mktemp("node-two") / "ray-start.log"
    nodes: list[subprocess.Popen[str]] = []
    deployment.redeploy(config)
    try:
        _wait_ready(base_url, deployment.env, ["tiny-p1"])  # tiny-p2 has no node yet
        client = deployment.client(base_url=base_url, api_key="none", timeout=90)
        timeline: list[str] = []
        nodes.append(start_node(deployment, log))
        _wait_ready(base_url, deployment.env, ["tiny-p2"])
        (p1,) = _placement(deployment, f"{NAME}-model-tiny-p1#").values()
        (p2,) = _placement(deployment, f"{NAME}-model-tiny-p2#").values()
        (router,) = _placement(deployment, f"{NAME}#router#").values()
        assert p1["head"] and router["head"], (p1, router)
        assert not p2["head"] and LABEL.items() <= p2["labels"].items(), p2
        assert ask(client, "p1") == "ok" and ask(client, "p2") == "ok"
        with steady_load(client, "p1", streams=1) as load:
            time.sleep(2)
            kill_tree(nodes[0])
            seen: list[tuple[float, str]] = []
            took = answers_within(client, "p2", "503 model_unavailable", 180, seen)
            timeline.append(f"node 2 killed; p2 answered 503 model_unavailable after {took:.0f} s: {seen}")
            # Once Serve knows, each request gets that answer at once.
            again = [ask(client, "p2") for _ in range(3)]
            assert again == ["503 model_unavailable"] * 3, again
            # Before Serve noticed, requests may have found the dead replica: each got an
            # answer with a code from the taxonomy, never 500 and never no answer.
            assert all(answer.split()[0] in {"502", "503", "504"} for _, answer in seen), seen
        timeline.append(f"{load.completed} streams on p1 meanwhile, {len(load.failures)} failed")
        assert load.completed > 0 and load.failures == [], load.failures
        # The node comes back (started with the machine quiet: on two busy cores its agent
        # can miss the raylet's start-up deadline).
        nodes.append(start_node(deployment, log))
        seen = []
        took = answers_within(client, "p2", "ok", 600, seen)
        timeline.append(f"node 2 back; p2 served after {took:.0f} s ({len(seen)} asks)")
        print(f"\nplacement: {timeline}")
        assert ask(client, "p1") == "ok"
        (p1_after,) = _placement(deployment, f"{NAME}-model-tiny-p1#").values()
        assert p1_after["node_id"] == p1["node_id"]  # the head's model never moved
        (p2_after,) = _placement(deployment, f"{NAME}-model-tiny-p2#").values()
        assert not p2_after["head"] and p2_after["node_id"] != p2["node_id"]  # on the new node
    finally:
        deployment.redeploy(base)  # the placement apps go first, so no replica is left pending
        for node in nodes:
            kill_tree(node)
