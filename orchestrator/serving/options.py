"""Ray Serve deployment options for a catalog model: resources, placement and scaling.

Pure functions of the catalog entry (no ray import), so the GPU paths, which cannot run on
a CPU-only machine, are unit-tested here.
"""

from __future__ import annotations

from typing import Any

from orchestrator.catalog import ModelSpec
from orchestrator.layout import GATEWAY_DEPLOYMENT
from orchestrator.serving.model_server import SHED_RETRY_AFTER_S
from orchestrator.settings import Settings

# Replicas get time to finish in-flight streams on scale-down or redeploy.
GRACEFUL_SHUTDOWN_S = 30.0
HEALTH_CHECK_PERIOD_S = 10.0
HEALTH_CHECK_TIMEOUT_S = 30.0
# Engine start loads weights (and compiles on GPU): allow it the time it needs.
STARTUP_TIMEOUT_S = 1800.0
# Requests past the shedding bound that Serve still hands to a replica to be refused there.
SHED_HEADROOM = 8


def engine_env(spec: ModelSpec, settings: Settings) -> dict[str, str]:
    """Environment variables for the engine's processes."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if spec.resources.device == "cpu" and "kv_cache_memory_bytes" not in spec.engine_args:
        # On the CPU, vLLM's KV cache is host RAM; the GPU default (0.92 of it) fails. An
        # entry's own `kv_cache_memory_bytes` sizes it instead (this variable would win).
        env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.kv_cache_gb)
    return env


def placement(spec: ModelSpec) -> dict[str, Any]:
    """Returns the resource part of the deployment options.

    * CPU: the replica actor reserves ``cpus``.
    * One GPU: the replica actor itself holds the GPU (``num_gpus=1``), pinned to the
      accelerator type when one is given.
    * Tensor parallel (N GPUs): a placement group with one bundle for the replica (CPU
      only) and one ``{"GPU": 1}`` bundle per shard, packed onto one node
      (``STRICT_PACK``: tensor parallelism needs the GPUs' fast interconnect). vLLM's Ray
      executor then places one worker in each GPU bundle.

    Custom resources and node labels pin the replica (every bundle of its placement group)
    to the nodes that have them: labels as the actor's ``label_selector``, or one bundle
    label selector that Serve applies to every bundle.
    """
    res = spec.resources
    actor: dict[str, Any] = {"num_cpus": res.cpus}
    if res.memory_gb:
        actor["memory"] = int(res.memory_gb * 1024**3)
    if res.custom:
        actor["resources"] = dict(res.custom)
    accel = {f"accelerator_type:{res.accelerator_type}": 0.001} if res.accelerator_type else {}
    labels = dict(res.node_labels)
    if res.device == "cpu" or res.tensor_parallel_size == 1:
        if res.device == "gpu":
            actor["num_gpus"] = 1
            if accel:
                actor["accelerator_type"] = res.accelerator_type
        if labels:
            actor["label_selector"] = labels
        return {"ray_actor_options": actor}
    replica_bundle: dict[str, float] = {"CPU": res.cpus, **res.custom}
    gpu_bundle: dict[str, float] = {"GPU": 1, **accel}
    options: dict[str, Any] = {
        "ray_actor_options": actor,
        "placement_group_bundles": [replica_bundle] + [dict(gpu_bundle) for _ in range(res.tensor_parallel_size)],
        "placement_group_strategy": "STRICT_PACK",
    }
    if labels:
        options["placement_group_bundle_label_selector"] = [labels]
    return options


# vLLM's max_num_seqs when the catalog does not set it is chosen per device at engine
# start; a replica's request bound is checked in the replica against the real figure, so
# Serve's own bound only needs to be at least as high.
DEFAULT_MAX_NUM_SEQS = 1024
# Serve averages replica reports over this window; short, so a queue is seen within seconds.
LOOK_BACK_PERIOD_S = 15.0
POLICY = "orchestrator.serving.autoscaling:QueueDepthPolicy"


def autoscaling_config(spec: ModelSpec) -> dict[str, Any]:
    """Serve's ``autoscaling_config`` for a model: the catalog's bounds and delays around
    the queue-depth policy (serving/autoscaling.py). Fixed-size models (min == max) use it
    too, so every model's replica figures come from one place."""
    scale = spec.autoscaling
    return {
        "min_replicas": scale.min_replicas,
        "max_replicas": scale.max_replicas,
        "upscale_delay_s": scale.upscale_delay_s,
        "downscale_delay_s": scale.downscale_delay_s,
        "downscale_to_zero_delay_s": scale.scale_to_zero_delay_s,
        "look_back_period_s": LOOK_BACK_PERIOD_S,
        "policy": {
            "policy_function": POLICY,
            "policy_kwargs": {"model": spec.name, "target_waiting_per_replica": scale.target_waiting_per_replica},
        },
    }


def model_deployment_options(spec: ModelSpec, settings: Settings) -> dict[str, Any]:
    """Returns the full ``Deployment.options(...)`` for the model's ModelServer."""
    options = placement(spec)
    options["ray_actor_options"]["runtime_env"] = {"env_vars": engine_env(spec, settings)}
    waiting = spec.overload.max_waiting_per_replica
    options.update(
        name=spec.deployment_name,
        # The replica sheds past max_num_seqs + max_waiting (ModelServer._admit); Serve lets a
        # few more through so that overflow reaches the replica and gets its 529 at once
        # instead of queueing in the router.
        max_ongoing_requests=(spec.max_num_seqs or DEFAULT_MAX_NUM_SEQS) + waiting + SHED_HEADROOM,
        # Not Serve's max_queued_requests: it also counts requests that are only being routed,
        # so a burst is refused while replicas have room. The router bounds the one queue
        # Serve would hold (requests waiting for a cold model) itself.
        #
        # Past max_ongoing_requests a request on the model's own route is refused by Serve
        # before our app sees it (a burst faster than the 529s): 503 with Retry-After, as
        # the replica's own 529 has.
        backpressure_config={"status_code": 503, "retry_after_s": SHED_RETRY_AFTER_S},
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
        autoscaling_config=autoscaling_config(spec),
    )
    return options


def router_deployment_options(settings: Settings) -> dict[str, Any]:
    """Returns the Router deployment's options."""
    return {
        "name": "router",
        "num_replicas": settings.router_replicas,
        "max_ongoing_requests": settings.router_max_ongoing_requests,
        "ray_actor_options": {"num_cpus": 0.1},
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
    }


def gateway_deployment_options(settings: Settings) -> dict[str, Any]:
    """Returns the gateway deployment's options: exactly one replica (it holds the ledger
    every router shares), restarted by Serve if it dies; it replays its journal on start."""
    return {
        "name": GATEWAY_DEPLOYMENT,
        "num_replicas": 1,
        "max_ongoing_requests": 4096,
        "ray_actor_options": {"num_cpus": 0.1},
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
    }
