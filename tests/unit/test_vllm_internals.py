"""What ``orchestrator/vllm_internals.py`` and the engine rely on in the installed vLLM: each test
names the use and fails with a message saying what changed, so that a vLLM upgrade breaks here
first rather than in a replica. And no other module reaches into vLLM's internals."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import re
from pathlib import Path
from types import SimpleNamespace, UnionType
from typing import Any, Union, get_args, get_origin

import pytest

from orchestrator import vllm_internals

_PACKAGE = Path(vllm_internals.__file__).parent


def _parameters(function: Any) -> set[str]:
    return set(inspect.signature(function).parameters)


def _shape(annotation: Any) -> str:
    """Returns a return annotation's outline: ``tuple[list, list] | ErrorResponse`` (the members
    of a union, each with the containers it holds; anything else inside is ``*``)."""

    def name(t: Any) -> str:
        return getattr(get_origin(t) or t, "__name__", "*")

    def member(t: Any) -> str:
        inner = [name(a) if get_origin(a) in (list, tuple) else "*" for a in get_args(t)]
        return name(t) + (f"[{', '.join(inner)}]" if inner else "")

    members = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return " | ".join(member(m) for m in members)


@pytest.mark.engine
def test_engine_arg_names_are_async_engine_args_fields() -> None:
    from vllm import AsyncEngineArgs

    names = vllm_internals.engine_arg_names()
    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    assert names == fields, (
        "vllm_internals.engine_arg_names (the catalog's engine_args check) no longer reads AsyncEngineArgs' fields "
        f"from vllm/engine/arg_utils.py: missing {sorted(fields - names)}, extra {sorted(names - fields)}"
    )
    assert {"dtype", "max_num_seqs", "enforce_eager"} <= names and "max_num_seq" not in names


@pytest.mark.engine
def test_merge_inline_system_is_still_set_and_taken() -> None:
    from vllm.entrypoints.anthropic.serving import AnthropicServingMessages

    use = "vllm_internals.merge_inline_system (the Messages dialect's translation)"
    init = inspect.getsource(AnthropicServingMessages.__init__)
    assert "self._merge_inline_system =" in init, f"{use}: AnthropicServingMessages no longer sets _merge_inline_system"
    assert "merge_inline_system" in _parameters(AnthropicServingMessages.to_chat_completion_request), (
        f"{use}: to_chat_completion_request no longer takes merge_inline_system"
    )
    assert vllm_internals.merge_inline_system(SimpleNamespace(_merge_inline_system=True)) is True


@pytest.mark.engine
@pytest.mark.parametrize(
    ("module", "cls", "method", "callers", "shape"),
    [
        (
            "vllm.entrypoints.openai.chat_completion.serving",
            "OpenAIServingChat",
            "render_chat_request",
            ["create_chat_completion", "_create_chat_completion"],
            "tuple[list, list] | ErrorResponse",
        ),
        (
            "vllm.entrypoints.openai.completion.serving",
            "OpenAIServingCompletion",
            "render_completion_request",
            ["create_completion", "_create_completion"],
            "list[*] | ErrorResponse",
        ),
    ],
)
def test_the_render_hooks_are_called_and_return_the_shape_read(
    module: str, cls: str, method: str, callers: list[str], shape: str
) -> None:
    """The engine overrides these to check the context window once the prompt is rendered
    (engine/vllm_engine.py) and reads their results with vllm_internals.rendered_*_inputs;
    ``callers`` is the chain from the public entry point down to the hook."""
    import importlib

    serving = getattr(importlib.import_module(module), cls)
    use = f"vllm_internals.rendered_*_inputs and the context-window check in {cls}.{method}"
    returned = inspect.signature(getattr(serving, method)).return_annotation
    assert _shape(returned) == shape, f"{use}: it now returns {returned}, not {shape}"
    for caller, callee in itertools.pairwise([*callers, method]):
        assert f"self.{callee}(" in inspect.getsource(getattr(serving, caller)), (
            f"{use}: {cls}.{caller} no longer calls {callee}, so the check would not run"
        )


def test_rendered_inputs_read_the_shapes() -> None:
    error = SimpleNamespace(error="bad")  # what an ErrorResponse stands for here
    assert vllm_internals.rendered_chat_inputs((["conversation"], ["a", "b"])) == ["a", "b"]
    assert vllm_internals.rendered_chat_inputs(error) is None
    assert vllm_internals.rendered_completion_inputs(["a"]) == ["a"]
    assert vllm_internals.rendered_completion_inputs(error) is None


@pytest.mark.engine
def test_the_public_prompt_length_counts_prompt_tokens() -> None:
    """extract_prompt_len replaced the private OpenAIServing._extract_prompt_len (which calls it)."""
    from vllm.renderers.inputs.preprocess import extract_prompt_len

    config = SimpleNamespace(is_encoder_decoder=False)
    assert extract_prompt_len(config, {"prompt_token_ids": [5, 6, 7]}) == 3, (
        "extract_prompt_len (the engine's context-window check) no longer counts prompt_token_ids"
    )


@pytest.mark.engine
def test_the_serving_layer_takes_what_the_engine_passes() -> None:
    """engine/vllm_engine.py builds vLLM's serving objects with these keywords; a vLLM that renames
    one fails here instead of in a replica's constructor."""
    from vllm import AsyncLLMEngine
    from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.renderers.online_renderer import OnlineRenderer

    parsing = {"chat_template", "chat_template_content_format", "enable_auto_tools", "tool_parser"}
    common = {"online_renderer", "request_logger", "enable_prompt_tokens_details"}
    expected: dict[str, tuple[Any, set[str]]] = {
        "AsyncLLMEngine.from_engine_args": (AsyncLLMEngine.from_engine_args, {"usage_context", "stat_loggers"}),
        "OpenAIServingModels": (OpenAIServingModels, {"engine_client", "base_model_paths", "lora_modules"}),
        "OnlineRenderer": (
            OnlineRenderer,
            {"model_config", "renderer", "request_logger", "reasoning_parser"} | parsing,
        ),
        "AnthropicServingMessages": (
            AnthropicServingMessages,
            {"engine_client", "models", "response_role", "reasoning_parser"} | parsing | common,
        ),
        "OpenAIServingCompletion": (OpenAIServingCompletion, {"engine_client", "models"} | common),
    }
    for name, (target, passed) in expected.items():
        missing = passed - _parameters(target)
        assert not missing, f"engine/vllm_engine.py passes {sorted(missing)} to {name}, which no longer takes them"
    positional = list(inspect.signature(AnthropicServingMessages).parameters)[:3]
    assert positional == ["engine_client", "models", "response_role"], (
        f"AnthropicServingMessages now starts {positional}"
    )
    assert isinstance(inspect.getattr_static(AnthropicServingMessages, "create_error_response"), staticmethod), (
        "engine/vllm_engine.py maps errors with AnthropicServingMessages.create_error_response(exc): no longer static"
    )


@pytest.mark.engine
def test_the_scheduler_view_is_still_a_complete_stat_logger() -> None:
    """The engine's load report (autoscaling) reads the scheduler's figures through a stat
    logger that vLLM calls with ``record(scheduler_stats, iteration_stats, ...)``."""
    from vllm.v1.metrics.loggers import StatLoggerBase
    from vllm.v1.metrics.stats import SchedulerStats

    from orchestrator.engine.vllm_engine import _SchedulerView

    use = "engine/vllm_engine.py _SchedulerView (the load report)"
    assert list(inspect.signature(StatLoggerBase.record).parameters)[1:3] == ["scheduler_stats", "iteration_stats"], (
        f"{use}: StatLoggerBase.record now takes {list(inspect.signature(StatLoggerBase.record).parameters)}"
    )
    view = _SchedulerView(None)  # raises TypeError if vLLM added an abstract method
    view.record(SchedulerStats(num_running_reqs=3, kv_cache_usage=0.5), None)
    assert (view.running, view.kv_cache_usage) == (3, 0.5), f"{use}: SchedulerStats' fields changed"


@pytest.mark.engine
def test_anthropic_serving_is_a_chat_serving_with_count_tokens() -> None:
    from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat

    assert issubclass(AnthropicServingMessages, OpenAIServingChat), "vLLM's Anthropic serving no longer extends chat"
    assert inspect.iscoroutinefunction(AnthropicServingMessages.count_tokens)


@pytest.mark.engine
def test_translation_of_a_tool_conversation() -> None:
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
    from vllm.entrypoints.anthropic.serving import AnthropicServingMessages

    request = AnthropicMessagesRequest.model_validate(
        {
            "model": "m",
            "max_tokens": 5,
            "system": "Be brief.",
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "w", "input": {"c": 1}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"}]},
            ],
            "tools": [{"name": "w", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any"},
        }
    )
    chat = AnthropicServingMessages.to_chat_completion_request(request).model_dump(exclude_unset=True)
    assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant", "tool"]
    assert chat["tool_choice"] == "required" and chat["max_tokens"] == 5


@pytest.mark.engine
def test_the_embedding_preprocessing_hook_is_called_and_fills_what_is_read() -> None:
    """engine/vllm_embedding.py mixes vllm_internals.TokenizedEmbeddingCheck into ServingEmbedding;
    the mixin overrides _preprocessing and reads each ctx.engine_inputs[i]["prompts"]["prompt_token_ids"]."""
    import dataclasses
    import typing

    from vllm.entrypoints.pooling.embed.serving import ServingEmbedding
    from vllm.entrypoints.pooling.typing import PoolingEngineInput, PoolingServeContext
    from vllm.inputs.engine import TokensInput

    from orchestrator.engine.vllm_embedding import _BoundedEmbedding

    use = "vllm_internals.TokenizedEmbeddingCheck (the embedding token bound)"
    hook = getattr(ServingEmbedding, "_preprocessing", None)
    assert hook is not None, f"{use}: ServingEmbedding no longer has _preprocessing"
    assert inspect.iscoroutinefunction(hook), f"{use}: ServingEmbedding._preprocessing is no longer async"
    parameters = list(inspect.signature(hook).parameters)
    assert parameters == ["self", "io_processor", "ctx"], f"{use}: _preprocessing now takes {parameters}"
    call = inspect.getsource(ServingEmbedding.__call__)
    assert "self._preprocessing(" in call, f"{use}: ServingEmbedding.__call__ no longer calls _preprocessing"
    assert call.index("self._preprocessing(") < call.index("self._prepare_generators("), (
        f"{use}: _preprocessing no longer runs before the inputs go to the engine"
    )
    fields = {f.name for f in dataclasses.fields(PoolingServeContext)}
    assert "engine_inputs" in fields, f"{use}: PoolingServeContext has no engine_inputs"
    assert "prompts" in typing.get_type_hints(PoolingEngineInput), f"{use}: PoolingEngineInput has no prompts"
    assert "prompt_token_ids" in TokensInput.__annotations__, f"{use}: TokensInput has no prompt_token_ids"
    mro = _BoundedEmbedding.__mro__
    assert vllm_internals.TokenizedEmbeddingCheck in mro and mro.index(vllm_internals.TokenizedEmbeddingCheck) < (
        mro.index(ServingEmbedding)
    ), f"{use}: the mixin must come before ServingEmbedding to override its _preprocessing"


async def test_the_embedding_check_sees_every_tokenized_input_after_vllms_preprocessing() -> None:
    """What vllm_internals.TokenizedEmbeddingCheck does over a stand-in for vLLM's serving class."""

    class Serving:
        async def _preprocessing(self, io_processor: Any, ctx: Any) -> None:
            ctx.engine_inputs = [{"prompts": {"prompt_token_ids": [1, 2, 3]}}, {"prompts": {"prompt": "no ids"}}]
            ctx.engine_inputs.append({"prompts": {"prompt_token_ids": [4, 5]}})

    seen: list[int] = []

    class Checked(vllm_internals.TokenizedEmbeddingCheck, Serving):
        def check_prompt_tokens(self, tokens: int) -> None:
            seen.append(tokens)

    ctx = SimpleNamespace(engine_inputs=None)
    await Checked()._preprocessing(None, ctx)
    assert seen == [5] and len(ctx.engine_inputs) == 3


_PRIVATE_VLLM = re.compile(
    r"\._(?:merge_inline_system|extract_prompt_len|preprocessing)\b|\bimport ast\b|arg_utils\.py"
)


def test_only_vllm_internals_reaches_into_vllm() -> None:
    offenders = [
        f"{path.relative_to(_PACKAGE.parent)}:{number}"
        for path in sorted(_PACKAGE.rglob("*.py"))
        if path.name != "vllm_internals.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _PRIVATE_VLLM.search(line)
    ]
    assert not offenders, "private vLLM interfaces outside orchestrator/vllm_internals.py: " + ", ".join(offenders)
