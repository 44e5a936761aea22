"""GPU placement cannot run on this machine, so its configuration is checked here."""

from __future__ import annotations

from pathlib import Path

from orchestrator.catalog import load_catalog
from orchestrator.serving.options import model_deployment_options, router_deployment_options
from orchestrator.settings import Settings

REPO = Path(__file__).resolve().parents[2]
GPU = load_catalog([REPO / "deployments" / "gpu-catalog"])
CPU = load_catalog([REPO / "catalog"])
SETTINGS = Settings(kv_cache_gb=2)


def test_cpu_model_reserves_cpus_and_sets_kv_cache() -> None:
    opts = model_deployment_options(CPU.resolve("tiny-random"), SETTINGS)
    actor = opts["ray_actor_options"]
    assert actor["num_cpus"] == 0.5 and "num_gpus" not in actor
    assert actor["runtime_env"]["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert "placement_group_bundles" not in opts
    assert opts["name"] == "model-tiny-random" and "num_replicas" not in opts
    # max_num_seqs 64 + max_waiting_per_replica 64 + headroom for refusals.
    assert opts["max_ongoing_requests"] == 64 + 64 + 8 and "max_queued_requests" not in opts
    # Past that, Serve's own refusal on the model's route says when to retry, as a 529 does.
    assert opts["backpressure_config"] == {"status_code": 503, "retry_after_s": 1}


def test_an_entry_that_sizes_its_kv_cache_in_bytes_gets_no_gib_override() -> None:
    spec = CPU.resolve("tiny-random")
    sized = spec.model_copy(update={"engine_args": {**spec.engine_args, "kv_cache_memory_bytes": 32 * 2**20}})
    env = model_deployment_options(sized, SETTINGS)["ray_actor_options"]["runtime_env"]["env_vars"]
    assert "VLLM_CPU_KVCACHE_SPACE" not in env  # vLLM's CPU platform lets the variable win


def test_single_gpu_model_holds_one_gpu_of_its_type() -> None:
    opts = model_deployment_options(GPU.resolve("qwen3-8b"), SETTINGS)
    actor = opts["ray_actor_options"]
    assert actor["num_gpus"] == 1 and actor["accelerator_type"] == "L4"
    assert "VLLM_CPU_KVCACHE_SPACE" not in actor["runtime_env"]["env_vars"]
    assert "placement_group_bundles" not in opts


def test_tensor_parallel_model_gets_packed_bundle_per_shard() -> None:
    opts = model_deployment_options(GPU.resolve("llama-70b"), SETTINGS)
    bundles = opts["placement_group_bundles"]
    assert bundles[0] == {"CPU": 8}
    assert bundles[1:] == [{"GPU": 1, "accelerator_type:A100": 0.001}] * 4
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    assert "num_gpus" not in opts["ray_actor_options"]


def test_autoscaling_bounds_become_serve_autoscaling_config() -> None:
    opts = model_deployment_options(GPU.resolve("qwen3-8b"), SETTINGS)
    config = opts["autoscaling_config"]
    assert config["min_replicas"] == 1 and config["max_replicas"] == 8
    assert config["upscale_delay_s"] == 5.0 and config["downscale_delay_s"] == 120.0
    assert config["policy"] == {
        "policy_function": "orchestrator.serving.autoscaling:QueueDepthPolicy",
        "policy_kwargs": {"model": "qwen3-8b", "target_waiting_per_replica": 2.0},
    }
    assert "num_replicas" not in opts
    # Serve accepts it (and can import the policy).
    from ray.serve.config import AutoscalingConfig

    parsed = AutoscalingConfig(**config)
    assert parsed.policy.get_policy().__name__ == "QueueDepthPolicy"


def test_scale_to_zero_model_starts_at_zero_with_its_idle_delay() -> None:
    config = model_deployment_options(GPU.resolve("smollm2-1.7b-instruct"), SETTINGS)["autoscaling_config"]
    assert config["min_replicas"] == 0 and "initial_replicas" not in config
    assert config["downscale_to_zero_delay_s"] == 900


def test_router_options() -> None:
    opts = router_deployment_options(Settings(router_replicas=3))
    assert opts["num_replicas"] == 3 and opts["name"] == "router"


def test_custom_resources_pin_a_replica_to_nodes_that_have_them() -> None:
    entry = CPU.resolve("tiny-random").model_copy(
        update={"resources": CPU.resolve("tiny-random").resources.model_copy(update={"custom": {"fast_disk": 1.0}})}
    )
    assert model_deployment_options(entry, SETTINGS)["ray_actor_options"]["resources"] == {"fast_disk": 1.0}


def _with(name: str, catalog: object, **resources: object) -> object:
    spec = catalog.resolve(name)  # type: ignore[attr-defined]
    return spec.model_copy(update={"resources": spec.resources.model_copy(update=resources)})


def test_node_labels_pin_a_replica_and_every_bundle_and_serve_accepts_them() -> None:
    from ray import serve

    from orchestrator.serving.model_server import ModelServer

    labels = {"zone": "in(us-east1-b,us-east1-c)", "market": "!spot"}
    cpu = model_deployment_options(_with("tiny-random", CPU, node_labels=labels), SETTINGS)  # type: ignore[arg-type]
    assert cpu["ray_actor_options"]["label_selector"] == labels
    gpu = model_deployment_options(_with("qwen3-8b", GPU, node_labels=labels), SETTINGS)  # type: ignore[arg-type]
    assert gpu["ray_actor_options"]["label_selector"] == labels and gpu["ray_actor_options"]["num_gpus"] == 1
    tp = model_deployment_options(_with("llama-70b", GPU, node_labels=labels), SETTINGS)  # type: ignore[arg-type]
    assert tp["placement_group_bundle_label_selector"] == [labels]  # Serve applies one selector to every bundle
    assert "label_selector" not in tp["ray_actor_options"]
    for options in (cpu, gpu, tp):
        serve.deployment(ModelServer).options(**options)  # Serve validates label selectors and bundles
    assert "label_selector" not in model_deployment_options(CPU.resolve("tiny-random"), SETTINGS)["ray_actor_options"]


def test_malformed_node_labels_are_refused() -> None:
    import pytest
    from pydantic import ValidationError

    from orchestrator.catalog import Resources

    with pytest.raises(ValidationError, match="node_labels"):
        Resources.model_validate({"node_labels": {"zone": ""}})
