"""Embeddings and the tokenizer routes through real Ray Serve, real vLLM engines (the default
catalog's all-MiniLM-L6-v2 on vLLM's pooling runner, SmolLM2 and a tiny model) and the real
gateway (PostgreSQL), driven by the official ``openai`` SDK and plain HTTP."""

from __future__ import annotations

import math
from decimal import Decimal

import httpx
import openai
import pytest

from orchestrator.catalog import load_catalog
from orchestrator.engine.weights import prepare_weights
from orchestrator.settings import Settings
from tests.integration.conftest import REPO, Deployment

pytestmark = pytest.mark.integration
SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome, I loved every minute of it!",
    "Paris is the capital of France.",
]
EMBEDDER = "model-all-minilm-l6-v2"


def reference_vectors(sentences: list[str]) -> list[list[float]]:
    """all-MiniLM-L6-v2's vectors computed with transformers as its sentence-transformers
    folder says (modules.json: the model, 1_Pooling's mean of the token vectors, Normalize)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    spec = load_catalog([REPO / "catalog"]).resolve("all-minilm-l6-v2")
    folder = prepare_weights(spec.source, Settings().cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return [[float(x) for x in row] for row in torch.nn.functional.normalize(pooled, p=2, dim=1)]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings_wake_the_model_and_match_the_reference(deployment: Deployment) -> None:
    # The default catalog's embedding model waits at zero replicas; HTTP to its own route wakes it.
    assert deployment.running_replicas(EMBEDDER) == 0
    route = deployment.client(base_url=deployment.base_url + "/models/all-minilm-l6-v2", timeout=600)
    woken = route.embeddings.create(model="all-minilm-l6-v2", input=SENTENCES[0], encoding_format="float")
    assert deployment.running_replicas(EMBEDDER) == 1
    assert len(woken.data) == 1 and len(woken.data[0].embedding) == 384
    # Through the router: a batch, as floats and as the SDK's default base64.
    client = deployment.client(timeout=120)
    floats = client.embeddings.create(model="minilm", input=SENTENCES, encoding_format="float")
    encoded = client.embeddings.create(model="minilm", input=SENTENCES, user="someone")
    assert [d.index for d in floats.data] == [0, 1, 2] and floats.model == "all-minilm-l6-v2"
    expected = reference_vectors(SENTENCES)
    for got, as_base64, want in zip(floats.data, encoded.data, expected, strict=True):
        assert cosine(got.embedding, want) >= 0.999
        assert cosine(as_base64.embedding, want) >= 0.999
    assert cosine(woken.data[0].embedding, expected[0]) >= 0.999
    # Metered: input tokens at the entry's price, one record per request.
    record = deployment.record(floats.id)  # type: ignore[attr-defined]
    assert record["model"] == "all-minilm-l6-v2" and record["completion_tokens"] == 0
    assert record["prompt_tokens"] == floats.usage.prompt_tokens == floats.usage.total_tokens > len(SENTENCES)
    price = Decimal("0.005") / 1_000_000
    assert (
        Decimal(str(record["cost"]))
        == Decimal(str(floats.usage.model_extra["cost"]))
        == price * record["prompt_tokens"]
    )  # type: ignore[index]
    # Token ids in, as OpenAI's SDK sends them for pre-tokenized text: the same vector.
    told = httpx.post(
        deployment.base_url + "/tokenize",
        json={"model": "minilm", "prompt": SENTENCES[2]},
        headers={"Authorization": f"Bearer {deployment.api_key}"},
        timeout=60,
    ).json()
    by_ids = client.embeddings.create(model="minilm", input=[told["tokens"]], encoding_format="float")
    assert cosine(by_ids.data[0].embedding, expected[2]) >= 0.999


def test_wrong_kinds_and_batches_past_the_bounds_are_400(deployment: Deployment) -> None:
    client = deployment.client(timeout=120)
    with pytest.raises(openai.BadRequestError) as to_chat_model:
        client.embeddings.create(model="tiny-a", input="hello")
    assert to_chat_model.value.code == "model_kind_mismatch"
    with pytest.raises(openai.BadRequestError) as chat_to_embedder:
        client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])
    assert chat_to_embedder.value.code == "model_kind_mismatch"
    assert "embedding model" in str(chat_to_embedder.value.message)
    # More inputs than the entry allows (256): refused by the router.
    with pytest.raises(openai.BadRequestError) as too_many:
        client.embeddings.create(model="minilm", input=["hi"] * 257)
    assert too_many.value.code == "invalid_request" and "at most 256 inputs" in str(too_many.value.message)
    # More tokens than the entry allows (32768) once tokenized: refused by the replica.
    with pytest.raises(openai.BadRequestError) as too_long:
        client.embeddings.create(model="minilm", input=["word " * 200] * 170)
    assert too_long.value.code == "invalid_request" and "at most 32768 tokens" in str(too_long.value.message)
    # dimensions: all-MiniLM-L6-v2 is not a Matryoshka model.
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="minilm", input="hi", dimensions=8)


def test_tokenize_counts_what_chat_counts_on_both_routes(deployment: Deployment) -> None:
    auth = {"Authorization": f"Bearer {deployment.api_key}"}
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    for base in (deployment.base_url, deployment.base_url + "/models/smollm2-135m-instruct"):
        told = httpx.post(base + "/tokenize", json={"model": "smollm2", "messages": messages}, headers=auth, timeout=60)
        assert told.status_code == 200, told.text
        chat = deployment.client(base_url=base).chat.completions.create(
            model="smollm2", messages=messages, max_tokens=1
        )  # type: ignore[arg-type]
        # The chat template is applied exactly as for the chat request.
        assert told.json()["count"] == chat.usage.prompt_tokens  # type: ignore[union-attr]
        text = httpx.post(
            base + "/tokenize",
            json={"model": "smollm2", "prompt": "Paris is lovely.", "add_special_tokens": False},
            headers=auth,
            timeout=60,
        )
        back = httpx.post(
            base + "/detokenize", json={"model": "smollm2", "tokens": text.json()["tokens"]}, headers=auth, timeout=60
        )
        assert back.status_code == 200 and back.json()["prompt"] == "Paris is lovely."
    bad = httpx.post(
        deployment.base_url + "/detokenize", json={"model": "tiny-a", "tokens": [10**9]}, headers=auth, timeout=60
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    scoped = deployment.new_key(models=["tiny-b"])
    denied = httpx.post(
        deployment.base_url + "/tokenize",
        json={"model": "tiny-a", "prompt": "x"},
        headers={"Authorization": f"Bearer {scoped}"},
        timeout=60,
    )
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed"
    assert (
        httpx.post(deployment.base_url + "/tokenize", json={"model": "tiny-a", "prompt": "x"}, timeout=60).status_code
        == 401
    )
