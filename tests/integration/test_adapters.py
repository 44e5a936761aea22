"""LoRA adapters through real Ray Serve and real vLLM, with the official openai SDK: tiny-a's
adapters (tests/integration/conftest.py) are models of their own in /v1/models, change the
base's output, are priced at their own rates, keep to keys' scopes, and load into a running
replica without failing the streams on their base; one added at run time through the admin
API serves without a restart and without failing a stream on its base, on /v1 and on its
base's route, survives a restart of the routers, and when removed and added again from
another folder serves the new weights; a replica keeps at most its bound of adapters."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Deployment, _run, steady_load

pytestmark = pytest.mark.integration
USER = [{"role": "user", "content": "Tell me a story about a cat."}]


def _answer(client: openai.OpenAI, model: str) -> str:
    done = client.chat.completions.create(model=model, messages=USER, max_tokens=16, temperature=0, seed=7)
    return done.choices[0].message.content or ""


def _until(done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 120
    while not done() and time.monotonic() < deadline:
        time.sleep(0.2)


def test_models_list_shows_each_adapter_with_its_parent(client: openai.OpenAI) -> None:
    cards = {m.id: m for m in client.models.list().data}
    assert cards["tiny-a-lora"].model_extra["parent"] == "tiny-a"  # type: ignore[index]
    assert cards["tiny-a-lora"].model_extra["aliases"] == ["a-lora"]  # type: ignore[index]
    assert cards["tiny-a"].model_extra["parent"] is None  # type: ignore[index]


def test_the_adapter_changes_the_output_of_its_base_on_both_routes(deployment: Deployment) -> None:
    client = deployment.client(timeout=120)
    base, adapted = _answer(client, "tiny-a"), _answer(client, "a-lora")
    assert base and adapted and adapted != base
    assert _answer(client, "tiny-a-lora") == adapted  # the same adapter by its display name
    route = deployment.client(base_url=deployment.base_url + "/models/tiny-a", timeout=120)
    assert _answer(route, "tiny-a-lora") == adapted  # its base model's own route serves it too
    assert _answer(route, "tiny-a") == base


def test_adapter_usage_is_priced_at_its_own_rate(deployment: Deployment) -> None:
    client = deployment.client(timeout=120)
    done = client.chat.completions.create(model="tiny-a-lora", messages=USER, max_tokens=8)
    usage = done.usage
    assert usage is not None and usage.completion_tokens > 0
    expected = (Decimal(5) * usage.prompt_tokens + Decimal(7) * usage.completion_tokens) / 1_000_000
    assert Decimal(str(usage.model_extra["cost"])) == expected  # type: ignore[index]
    record = deployment.record(done.id)
    assert record["model"] == "tiny-a-lora" and Decimal(str(record["cost"])) == expected


def test_a_key_scoped_to_the_base_gets_403_for_its_adapter(deployment: Deployment) -> None:
    client = deployment.client(api_key=deployment.new_key(models=["tiny-a"]), timeout=120)
    assert _answer(client, "tiny-a")
    with pytest.raises(openai.PermissionDeniedError) as info:
        _answer(client, "tiny-a-lora")
    assert info.value.body["code"] == "model_not_allowed"  # type: ignore[index]


def test_loading_an_adapter_under_streaming_load_on_its_base_fails_no_stream(deployment: Deployment) -> None:
    client = deployment.client(timeout=120)
    with steady_load(client, "tiny-a", streams=3) as load:
        _until(lambda: load.completed >= 3 or bool(load.failures))
        assert _answer(client, "tiny-a-lora-2")  # its first request loads it into the running replica
        seen = load.completed
        _until(lambda: load.completed >= seen + 3 or bool(load.failures))
    assert load.failures == [] and load.completed >= 6


def test_an_adapter_added_at_run_time_under_streaming_load_fails_no_stream(deployment: Deployment) -> None:
    client = deployment.client(timeout=120)
    body = {"name": "tiny-a-runtime", "base": "tiny-a", "path": str(deployment.spare_adapter)}
    actors = deployment.replica_actors("model-tiny-a")

    with steady_load(client, "tiny-a", streams=3) as load:
        _until(lambda: load.completed >= 3 or bool(load.failures))
        added = deployment.admin("POST", "/admin/adapters", json=body)
        assert added.status_code == 201, added.text
        assert _everywhere(client, "tiny-a-runtime")  # both router replicas know it
        seen = load.completed
        _until(lambda: load.completed >= seen + 3 or bool(load.failures))
    assert load.failures == [] and load.completed >= 6
    assert _answer(client, "tiny-a-runtime") != _answer(client, "tiny-a")
    assert deployment.replica_actors("model-tiny-a") == actors  # no replica of the base restarted
    listed = deployment.cli("adapters", "list", "--json")
    assert listed.returncode == 0 and "tiny-a-runtime" in listed.stdout
    assert deployment.cli("adapters", "remove", "tiny-a-runtime").returncode == 0
    assert _everywhere(client, "tiny-a-runtime", served=False)
    with pytest.raises(openai.NotFoundError):
        _answer(client, "tiny-a-runtime")


# ----------------------------------------------------------------------------- run-time adapters


def _served(client: openai.OpenAI, model: str) -> bool:
    """Whether ``model`` answers: False for a router that does not know it (yet, or any more)
    and, while routers restart, for a refused or lost connection."""
    try:
        return bool(_answer(client, model))
    except (openai.NotFoundError, openai.APIConnectionError, openai.InternalServerError):
        return False


def _everywhere(client: openai.OpenAI, model: str, *, served: bool = True) -> bool:
    """Returns once every call for 2 s has found ``model`` served (or, with ``served`` False,
    not served), False if that took over 120 s. The routers, and a model's route, read the
    adapters table every second (ORCH_KEY_CACHE_SECONDS=1): calls that agree for two periods
    mean that each of them has read it since it changed, whichever replicas the calls reached
    (a few fast calls in a row may all reach the one replica that has)."""
    deadline = time.monotonic() + 120
    agreed_since = time.monotonic()
    while time.monotonic() < deadline:
        if _served(client, model) is not served:
            agreed_since = time.monotonic()
        elif time.monotonic() - agreed_since >= 2:
            return True
        time.sleep(0.1)
    return False


def _add(deployment: Deployment, name: str, path: Path, **fields: object) -> None:
    body = {"name": name, "base": "tiny-a", "path": str(path), **fields}
    added = deployment.admin("POST", "/admin/adapters", json=body)
    assert added.status_code == 201, added.text


def _remove(deployment: Deployment, name: str, *, added: bool = True) -> None:
    """Removes ``name`` and waits until no router serves it, so that the tests after this one
    see only the catalog's adapters. With ``added`` False, a name never added (404) is fine."""
    removed = deployment.admin("DELETE", f"/admin/adapters/{name}")
    assert removed.status_code == 200 or (not added and removed.status_code == 404), removed.text
    assert _everywhere(deployment.client(timeout=120), name, served=False)


def _lora_2(deployment: Deployment) -> Path:
    """The folder of tiny-a's catalog adapter `tiny-a-lora-2` (conftest builds it beside the spare one)."""
    assert deployment.spare_adapter is not None
    return deployment.spare_adapter.parent / "lora-2"


def test_a_run_time_adapter_serves_on_its_bases_route_with_its_own_scope_and_price(deployment: Deployment) -> None:
    assert deployment.spare_adapter is not None
    client = deployment.client(timeout=120)
    route_url = deployment.base_url + "/models/tiny-a"
    route = deployment.client(base_url=route_url, timeout=120)
    _add(deployment, "tiny-a-routed", deployment.spare_adapter, pricing={"input_per_million": "3"})
    assert _everywhere(client, "tiny-a-routed") and _everywhere(route, "tiny-a-routed")
    assert _answer(route, "tiny-a-routed") == _answer(client, "tiny-a-routed") != _answer(route, "tiny-a")
    done = route.chat.completions.create(model="tiny-a-routed", messages=USER, max_tokens=8)
    assert done.model == "tiny-a-routed" and done.usage is not None  # its name, not the id vLLM runs it by
    chunks = list(route.chat.completions.create(model="tiny-a-routed", messages=USER, max_tokens=4, stream=True))
    assert chunks and {c.model for c in chunks} == {"tiny-a-routed"}
    cost = Decimal(3) * done.usage.prompt_tokens / 1_000_000  # output at 0: its own prices, not tiny-a's
    assert Decimal(str(done.usage.model_extra["cost"])) == cost  # type: ignore[index]
    scoped = deployment.client(api_key=deployment.new_key(models=["tiny-a"]), base_url=route_url, timeout=120)
    with pytest.raises(openai.PermissionDeniedError) as info:
        _answer(scoped, "tiny-a-routed")
    assert info.value.body["code"] == "model_not_allowed"  # type: ignore[index]
    _remove(deployment, "tiny-a-routed")
    assert _everywhere(route, "tiny-a-routed", served=False)


def test_an_adapter_removed_and_added_again_from_another_folder_serves_the_new_weights(
    deployment: Deployment,
) -> None:
    """The base's replica still holds the first folder's weights when the name comes back;
    the name's requests must run the second folder's (tiny-a-lora-2's weights here)."""
    assert deployment.spare_adapter is not None
    client = deployment.client(timeout=120)
    route = deployment.client(base_url=deployment.base_url + "/models/tiny-a", timeout=120)
    _add(deployment, "tiny-a-readded", deployment.spare_adapter)
    assert _everywhere(client, "tiny-a-readded")
    first = _answer(client, "tiny-a-readded")
    _remove(deployment, "tiny-a-readded")
    assert _everywhere(client, "tiny-a-readded", served=False) and _everywhere(route, "tiny-a-readded", served=False)
    _add(deployment, "tiny-a-readded", _lora_2(deployment))
    assert _everywhere(client, "tiny-a-readded") and _everywhere(route, "tiny-a-readded")
    expected = _answer(client, "tiny-a-lora-2")
    assert expected != first
    assert [_answer(client, "tiny-a-readded") for _ in range(4)] == [expected] * 4
    assert _answer(route, "tiny-a-readded") == expected
    _remove(deployment, "tiny-a-readded")


_KILL_ALL = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
found = [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
         if a["name"].startswith("SERVE_REPLICA") and sys.argv[2] in a["name"]]
for name, namespace in found:
    ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
print(len(found))
"""


def test_a_run_time_adapter_outlives_a_restart_of_every_router_replica(deployment: Deployment) -> None:
    """Both router replicas are killed; the ones Serve starts in their place know the adapter
    only from the database."""
    assert deployment.spare_adapter is not None
    client = deployment.client(timeout=120)
    _add(deployment, "tiny-a-kept", deployment.spare_adapter)
    assert _everywhere(client, "tiny-a-kept")
    before = _answer(client, "tiny-a-kept")
    routers = deployment.replica_actors("orchestrator#router#")
    killed = _run(deployment.env, sys.executable, "-c", _KILL_ALL, deployment.gcs_address, "orchestrator#router#")
    assert killed.returncode == 0 and killed.stdout.split() == [str(len(routers))], killed.stderr[-2000:]
    _until(lambda: len(deployment.replica_actors("orchestrator#router#") - routers) == len(routers))
    assert not deployment.replica_actors("orchestrator#router#") & routers  # all of them are new
    assert _everywhere(client, "tiny-a-kept")
    assert _answer(client, "tiny-a-kept") == before
    _remove(deployment, "tiny-a-kept")


def _multiplexing(deployment: Deployment) -> tuple[float, float]:
    """tiny-a's replica as Serve's multiplexing reports it: (adapters held, evictions so far)."""
    text = httpx.get(deployment.metrics_url, timeout=30).text
    held = unloads = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("deployment") != "model-tiny-a":
                continue
            if sample.name == "ray_serve_num_multiplexed_models":
                held = max(held, sample.value)
            elif sample.name.startswith("ray_serve_multiplexed_models_unload_counter"):
                unloads += sample.value
    return held, unloads


def test_a_replica_keeps_at_most_its_bound_of_adapters_loaded(deployment: Deployment) -> None:
    """tiny-a holds at most 4 adapters (its `lora` default): five called in turn, twice, all
    answer as they did the first time, while its replica evicts one for each it loads."""
    assert deployment.spare_adapter is not None
    client = deployment.client(timeout=120)
    extra = [f"tiny-a-bound-{i}" for i in range(3)]
    try:
        for name in extra:
            _add(deployment, name, deployment.spare_adapter)
        assert all(_everywhere(client, name) for name in extra)
        names = ["tiny-a-lora", "tiny-a-lora-2", *extra]
        _, unloads_before = _multiplexing(deployment)
        first = {name: _answer(client, name) for name in names}
        again = {name: _answer(client, name) for name in names}  # each one was evicted since it ran
        assert again == first
        scrapes: list[tuple[float, float]] = []

        def evicted_and_full() -> bool:
            # Serve counts an unload at once but sets the held gauge on its own periodic push,
            # which may have run between an unload and the load after it: wait for both.
            scrapes.append(_multiplexing(deployment))
            held, unloads = scrapes[-1]
            return unloads - unloads_before >= len(names) and held == 4

        _until(evicted_and_full)
        held, unloads = scrapes[-1]
        assert unloads - unloads_before >= len(names) and held == 4
        assert max(h for h, _ in scrapes) <= 4
    finally:  # the other tests' model lists know only the catalog's adapters
        for name in extra:
            _remove(deployment, name, added=False)
