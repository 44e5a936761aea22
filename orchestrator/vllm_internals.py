"""Every private or internal vLLM interface the orchestrator relies on, one small function (or
mixin) each.

vLLM 0.32 has no public API for these; each names the public one it waits for. The engine
(``engine/vllm_engine.py``, ``engine/vllm_embedding.py``) and the catalog check use only these,
so a vLLM upgrade that moves one breaks here, and ``tests/unit/test_vllm_internals.py`` checks
the installed vLLM still provides each (the name, the parameters passed, the shape used),
failing with a message that names the use.

Nothing from vLLM is imported here, at module level or in a function: the functions take vLLM's
objects from the engine, the engine mixes :class:`TokenizedEmbeddingCheck` into vLLM's class,
and :func:`engine_arg_names` reads vLLM's source. So the catalog check
in ``orchestrator.serving.builder`` (the router's package, which must not import vLLM) can use
this module.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import cache
from pathlib import Path
from typing import Any

_ARG_CLASSES = ("EngineArgs", "AsyncEngineArgs")


@cache
def engine_arg_names() -> frozenset[str]:
    """Returns the field names of the installed vLLM's ``AsyncEngineArgs`` (those of ``EngineArgs``
    and its own).

    Parses ``vllm/engine/arg_utils.py`` instead of importing it: the import pulls in torch and
    transformers (about 8 s here), the parse takes ~0.1 s and gives the same set. Waits for: the
    engine arguments published without the import (a schema file, or a light module).

    Raises:
        RuntimeError: vLLM is not installed.
    """
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("vLLM is not installed; cannot check engine_args")
    source = Path(next(iter(spec.submodule_search_locations))) / "engine" / "arg_utils.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in _ARG_CLASSES:
            names.update(
                item.target.id
                for item in node.body
                if isinstance(item, ast.AnnAssign)
                and isinstance(item.target, ast.Name)
                and not ast.unparse(item.annotation).startswith("ClassVar")
            )
    return frozenset(names)


def merge_inline_system(serving: Any) -> bool:
    """Returns whether vLLM's Anthropic serving ``serving`` merges system messages found inside a
    Messages conversation into the leading system prompt (its choice for the chat template,
    made in its constructor), to pass to its public ``to_chat_completion_request``.

    Reads ``AnthropicServingMessages._merge_inline_system``. Waits for: that choice as a public
    attribute, or a public method that translates with it (``create_messages`` translates and
    generates in one call).
    """
    return bool(serving._merge_inline_system)


def rendered_chat_inputs(result: Any) -> list[Any] | None:
    """Returns the engine inputs in what ``OpenAIServingChat.render_chat_request`` returned (a
    ``(conversation, engine_inputs)`` tuple), or None for its ``ErrorResponse``.

    Relies on that return shape (documented in vLLM's docstring, not a stable API). Waits for: a
    public hook that sees each rendered prompt before generation.
    """
    return list(result[1]) if isinstance(result, tuple) else None


def rendered_completion_inputs(result: Any) -> list[Any] | None:
    """Returns the engine inputs in what ``OpenAIServingCompletion.render_completion_request``
    returned (a list of them), or None for its ``ErrorResponse``.

    Relies on that return shape, as :func:`rendered_chat_inputs`. Waits for: the same hook.
    """
    return list(result) if isinstance(result, list) else None


class TokenizedEmbeddingCheck:
    """A mixin for vLLM's ``ServingEmbedding`` (list it first among the bases): once vLLM has
    tokenized a request's inputs, and before any reaches the engine, calls
    :meth:`check_prompt_tokens` with their prompt tokens together, so that it can refuse the
    request by raising.

    Overrides ``PoolingServing._preprocessing(io_processor, ctx)`` (private; ``__call__`` calls it
    before generation) and reads ``ctx.engine_inputs`` (each a ``PoolingEngineInput`` whose
    ``prompts`` holds ``prompt_token_ids``). Waits for: a public hook that sees each tokenized
    pooling input before generation.
    """

    async def _preprocessing(self, io_processor: Any, ctx: Any) -> None:
        await super()._preprocessing(io_processor, ctx)  # type: ignore[misc]
        inputs = ctx.engine_inputs or ()
        self.check_prompt_tokens(sum(len(i["prompts"].get("prompt_token_ids") or ()) for i in inputs))

    def check_prompt_tokens(self, tokens: int) -> None:
        """Raises to refuse a request of ``tokens`` prompt tokens (all its inputs together)."""
        raise NotImplementedError
