"""LoRA adapters through real Ray Serve and real vLLM, with the official openai SDK: tiny-a's
adapters (tests/integration/conftest.py) are models of their own in /v1/models, change the
base's output, are priced at their own rates, keep to keys' scopes, and load into a running
replica without failing the streams on their base; one added at run time through the admin
API serves without a restart and without failing a stream on its base."""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal

import openai
import pytest

from tests.integration.conftest import Deployment, steady_load

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

    def served() -> bool:
        try:
            return bool(_answer(client, "tiny-a-runtime"))
        except openai.NotFoundError:  # a router replica that has not read the table yet
            return False

    with steady_load(client, "tiny-a", streams=3) as load:
        _until(lambda: load.completed >= 3 or bool(load.failures))
        added = deployment.admin("POST", "/admin/adapters", json=body)
        assert added.status_code == 201, added.text
        _until(lambda: sum(served() for _ in range(4)) == 4)  # both router replicas know it
        seen = load.completed
        _until(lambda: load.completed >= seen + 3 or bool(load.failures))
    assert load.failures == [] and load.completed >= 6
    assert _answer(client, "tiny-a-runtime") != _answer(client, "tiny-a")
    assert deployment.replica_actors("model-tiny-a") == actors  # no replica of the base restarted
    listed = deployment.cli("adapters", "list", "--json")
    assert listed.returncode == 0 and "tiny-a-runtime" in listed.stdout
    assert deployment.cli("adapters", "remove", "tiny-a-runtime").returncode == 0
    _until(lambda: not any(served() for _ in range(4)))
    with pytest.raises(openai.NotFoundError):
        _answer(client, "tiny-a-runtime")
