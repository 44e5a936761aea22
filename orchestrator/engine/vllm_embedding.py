"""Embeddings on the vLLM engine: vLLM's own embedding serving over an engine started with
its pooling runner, so tokenization, the pooling the model's folder names (for a
sentence-transformers folder, its ``modules.json``), normalization, ``dimensions`` and
``encoding_format`` are exactly ``vllm serve``'s. This module only bounds a request's
tokens and hands back plain data.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter
from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest
from vllm.entrypoints.pooling.embed.serving import ServingEmbedding
from vllm.renderers.chat_utils import ChatTemplateConfig

from orchestrator.catalog import ModelSpec
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.vllm_internals import TokenizedEmbeddingCheck

_REQUEST: TypeAdapter[Any] = TypeAdapter(EmbeddingRequest)


class _BoundedEmbedding(TokenizedEmbeddingCheck, ServingEmbedding):  # type: ignore[misc]
    """vLLM's embedding serving, refusing a request whose inputs together exceed the
    catalog's token bound once they are tokenized (before any reaches the engine)."""

    def __init__(self, *args: Any, spec: ModelSpec, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spec = spec

    def check_prompt_tokens(self, tokens: int) -> None:
        bound = self.spec.embedding.max_tokens
        if tokens > bound:
            raise OrchestratorError(
                ErrorCode.INVALID_REQUEST,
                f"Model {self.spec.name} takes at most {bound} tokens per request; these inputs have {tokens}. "
                "Split the batch.",
                param="input",
            )


class Embedder:
    """Answers OpenAI embeddings bodies on a started pooling engine.

    Args:
        engine: vLLM's ``AsyncLLM``, started with ``runner="pooling"``.
        models: vLLM's ``OpenAIServingModels`` of the engine.
        spec: the catalog entry (name, chat template, bounds).
    """

    def __init__(self, engine: Any, models: Any, spec: ModelSpec) -> None:
        self.spec = spec
        config = ChatTemplateConfig(chat_template=spec.chat_template)
        self._serving = _BoundedEmbedding(engine, models, request_logger=None, chat_template_config=config, spec=spec)

    async def embed(self, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        """Returns OpenAI's embeddings body (``id`` = ``gen-<request_id>``, usage included).

        Raises:
            pydantic.ValidationError: the body is not one vLLM takes.
            OrchestratorError: past the token bound.
            Exception: vLLM's own refusals (``ValueError`` for input it cannot embed, such as
                ``dimensions`` the model was not trained for); the engine maps them.
        """
        request = _REQUEST.validate_python({**body, "model": self.spec.name, "request_id": request_id})
        response = await self._serving(request, None)
        data: dict[str, Any] = json.loads(bytes(response.body))
        data["id"] = f"gen-{request_id}"
        # OpenAI's usage of an embedding: vLLM adds completion counts and empty details.
        data["usage"] = {k: v for k, v in data.get("usage", {}).items() if v is not None}
        return data
