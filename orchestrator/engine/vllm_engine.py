"""The vLLM engine: ``AsyncLLM`` plus vLLM's own OpenAI serving layer.

vLLM's serving classes give chat templates, stop, n, seed, logprobs, penalties, guided
JSON and the tool-call and reasoning parsers exactly as ``vllm serve`` has them; this
module only adapts their output to the orchestrator's contract (``gen-`` ids, one error
taxonomy, a usage chunk on every stream). An embedding model (catalog ``task: embed``) runs
vLLM's pooling runner and its embedding serving (:mod:`orchestrator.engine.vllm_embedding`)
instead of the chat and completions serving. These two are the only modules that import vllm.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
from collections.abc import AsyncIterator
from typing import Any

from pydantic import TypeAdapter, ValidationError
from vllm import AsyncEngineArgs, AsyncLLMEngine
from vllm.entrypoints.anthropic.protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.entrypoints.openai.models.protocol import BaseModelPath
from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest
from vllm.entrypoints.serve.tokenize.serving import ServingTokenization
from vllm.renderers.inputs.preprocess import extract_prompt_len
from vllm.renderers.online_renderer import OnlineRenderer
from vllm.usage.usage_lib import UsageContext
from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

from orchestrator.catalog import ModelSpec
from orchestrator.engine.base import EngineLoad, Kind
from orchestrator.engine.frames import (
    ChoiceUsage,
    complete_usage,
    error_from_frame,
    is_usage_frame,
    map_engine_error,
    patch_usage_frame,
    split_usage,
    usage_trailer,
)
from orchestrator.engine.requests import strict_forced_tools
from orchestrator.engine.vllm_embedding import Embedder
from orchestrator.engine.weights import prepare_weights
from orchestrator.errors import ErrorCode, OrchestratorError
from orchestrator.metrics import NullSink, PrefixCacheMetrics, Sink
from orchestrator.protocol.openai import prompt_count
from orchestrator.protocol.tokens import TokensOp
from orchestrator.settings import Settings
from orchestrator.vllm_internals import merge_inline_system, rendered_chat_inputs, rendered_completion_inputs

logger = logging.getLogger(__name__)

_ID_PREFIX: dict[Kind, str] = {"chat": "chatcmpl-", "completion": "cmpl-", "messages": "chatcmpl-"}


def _typed_engine_args(args: dict[str, Any]) -> dict[str, Any]:
    """Turns YAML mappings into vLLM's config dataclasses (e.g. structured_outputs_config)."""
    types: dict[str, Any] = {f.name: f.type for f in dataclasses.fields(AsyncEngineArgs)}
    out = {}
    for key, value in args.items():
        if isinstance(value, dict) and not isinstance(types.get(key, dict), str):
            value = TypeAdapter(types[key]).validate_python(value)
        out[key] = value
    return out


def engine_args_for(spec: ModelSpec, model_path: str) -> dict[str, Any]:
    """Returns vLLM ``AsyncEngineArgs`` keyword arguments for a catalog entry."""
    args: dict[str, Any] = {
        "disable_log_stats": False,
        **spec.engine_args,
        "model": model_path,
        "served_model_name": [spec.name],
        "max_model_len": spec.context_window,
        "tensor_parallel_size": spec.resources.tensor_parallel_size,
    }
    if spec.resources.tensor_parallel_size > 1:
        # Shards run as Ray actors in the replica's placement group bundles.
        args.setdefault("distributed_executor_backend", "ray")
    if spec.reasoning_parser:
        args["reasoning_parser"] = spec.reasoning_parser
    if spec.task == "embed":
        args["runner"] = "pooling"
    else:
        args.update(media_engine_args(spec))
    if spec.lora is not None:
        # Every adapter a replica holds may run in one batch; the worker keeps no others.
        slots = spec.lora.max_loaded_per_replica
        args.update(enable_lora=True, max_loras=slots, max_cpu_loras=slots, max_lora_rank=spec.lora.max_rank)
    return args


# vLLM fetches from any host when its list of allowed media domains is empty; a name that
# no URL's host can be (hosts end at a "/") makes it fetch from none.
NO_REMOTE_MEDIA = "no-remote-media/"


def media_engine_args(spec: ModelSpec) -> dict[str, Any]:
    """The engine's own bounds on media, from the catalog entry (the router checks the same
    first, orchestrator/api/images.py): remote images only from the entry's allowed hosts
    (none: from no host), never a local file, and at most its images per request."""
    args: dict[str, Any] = {
        "allowed_media_domains": list(spec.images.allowed_domains) or [NO_REMOTE_MEDIA],
        "allowed_local_media_path": "",
    }
    if spec.capabilities.vision:
        args["limit_mm_per_prompt"] = {"image": spec.images.max_per_request}
    return args


def media_environment(spec: ModelSpec) -> dict[str, str]:
    """vLLM's media settings that are environment variables: downloads follow no redirect
    (an allowed host could send one anywhere) and stop past the entry's image size."""
    return {
        "VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0",
        "VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB": str(max(1, math.ceil(spec.images.max_bytes / 2**20))),
    }


def _check_window(serving: Any, request: Any, engine_inputs: list[Any] | None) -> None:
    # vLLM silently shortens max_tokens when prompt + max_tokens exceeds the window; an
    # OpenAI client expects a 400 instead, so the budget is checked once the prompt is known.
    budget = getattr(request, "max_completion_tokens", None) or request.max_tokens
    if budget is None or engine_inputs is None:
        return
    window = serving.model_config.max_model_len
    for engine_input in engine_inputs:
        prompt = extract_prompt_len(serving.model_config, engine_input)
        if prompt + budget > window:
            raise OrchestratorError(
                ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"This model's context window is {window} tokens, but the prompt has {prompt} tokens "
                f"and max_tokens asks for {budget} more. Shorten the prompt or lower max_tokens.",
                param="max_tokens" if request.max_tokens == budget else "max_completion_tokens",
            )


class _StrictChat(AnthropicServingMessages):  # type: ignore[misc]
    """vLLM's chat serving, with the context window checked. vLLM's Anthropic serving is a
    subclass of its chat serving that translates a Messages request into a chat request, so
    one object answers both dialects with the same template, tool parser and renderer."""

    async def render_chat_request(self, request: Any) -> Any:
        result = await super().render_chat_request(request)
        _check_window(self, request, rendered_chat_inputs(result))
        return result

    def chat_body(self, messages: AnthropicMessagesRequest) -> dict[str, Any]:
        """Returns the OpenAI chat body vLLM's own translation makes of a Messages request
        (system prompt, blocks, images, tool use and results, tool choice, thinking)."""
        request = self.to_chat_completion_request(messages, merge_inline_system=merge_inline_system(self))
        body: dict[str, Any] = request.model_dump(mode="json", exclude_unset=True)
        return body


class _StrictCompletion(OpenAIServingCompletion):  # type: ignore[misc]
    async def render_completion_request(self, request: Any) -> Any:
        result = await super().render_completion_request(request)
        _check_window(self, request, rendered_completion_inputs(result))
        return result


class _SchedulerView(StatLoggerBase):  # type: ignore[misc]
    """Keeps the engine core's latest scheduler figures (vLLM calls ``record`` after
    every engine step that produced output) and hands its prefix-cache lookups to
    ``prefix_cache`` (the figures vLLM's own ``vllm:prefix_cache_*`` counters add up)."""

    def __init__(self, vllm_config: Any, engine_index: int = 0, prefix_cache: PrefixCacheMetrics | None = None) -> None:
        self.running = 0
        self.kv_cache_usage = 0.0
        self._prefix_cache = prefix_cache

    def record(
        self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
    ) -> None:
        if scheduler_stats is not None:
            self.running = scheduler_stats.num_running_reqs
            self.kv_cache_usage = scheduler_stats.kv_cache_usage
            lookups = scheduler_stats.prefix_cache_stats
            if self._prefix_cache is not None and lookups is not None:
                self._prefix_cache.observe(lookups.queries, lookups.hits)

    def log_engine_initialized(self) -> None:
        pass


class VLLMEngine:
    """One vLLM engine serving one catalog model. No I/O until :meth:`start`.

    Its statistics go two ways: vLLM's Ray stat logger exports vLLM's own metrics
    (``vllm:*``, labelled by ``model_name``) through Ray's metrics pipeline, and a small
    logger keeps the scheduler's latest figures for :meth:`load` (autoscaling) and records
    the prefix-cache lookups' recent rates into ``metrics``.
    """

    def __init__(self, spec: ModelSpec, settings: Settings, metrics: Sink | None = None) -> None:
        self.spec = spec
        self.settings = settings
        self._llm: Any = None
        self._chat: Any = None
        self._completion: Any = None
        self._tokenization: Any = None
        self._embedder: Embedder | None = None
        self._models: Any = None
        self._scheduler = _SchedulerView(None, prefix_cache=PrefixCacheMetrics(metrics or NullSink(), spec.name))
        self._capacity = 1

    async def start(self) -> None:
        path = await asyncio.to_thread(prepare_weights, self.spec.source, self.settings.cache_dir)
        # Read by vLLM when it loads media, in this process (the replica's: one engine each).
        os.environ.update(media_environment(self.spec))
        args = AsyncEngineArgs(**_typed_engine_args(engine_args_for(self.spec, path)))
        self._llm = AsyncLLMEngine.from_engine_args(
            args,
            usage_context=UsageContext.OPENAI_API_SERVER,
            stat_loggers=[RayPrometheusStatLogger, self._scheduler_view],
        )
        self._capacity = int(self._llm.vllm_config.scheduler_config.max_num_seqs)
        self._models = models = OpenAIServingModels(
            engine_client=self._llm,
            base_model_paths=[BaseModelPath(name=self.spec.name, model_path=path)],
            lora_modules=None,
        )
        await models.init_static_loras()
        # The renderer and the chat server both need the template and tool-parser options.
        parsing: dict[str, Any] = {
            "chat_template": self.spec.chat_template,
            "chat_template_content_format": "auto",
            "enable_auto_tools": bool(self.spec.tool_call_parser),
            "tool_parser": self.spec.tool_call_parser,
        }
        renderer = OnlineRenderer(
            model_config=self._llm.model_config,
            renderer=self._llm.renderer,
            request_logger=None,
            reasoning_parser=self.spec.reasoning_parser,
            **parsing,
        )
        renderer.warmup()
        common: dict[str, Any] = {
            "online_renderer": renderer,
            "request_logger": None,
            "enable_prompt_tokens_details": True,
        }
        if self.spec.task == "embed":
            self._embedder = Embedder(self._llm, models, self.spec)
        else:
            self._chat = _StrictChat(
                self._llm, models, "assistant", reasoning_parser=self.spec.reasoning_parser or "", **parsing, **common
            )
            self._completion = _StrictCompletion(self._llm, models, **common)
        self._tokenization = ServingTokenization(
            models,
            renderer,
            chat_template=self.spec.chat_template,
            chat_template_content_format="auto",
            request_logger=None,
        )

    def _scheduler_view(self, vllm_config: Any, engine_index: int = 0) -> _SchedulerView:
        return self._scheduler  # the stat logger factory vLLM calls per engine core

    def _chat_body(self, kind: Kind, body: dict[str, Any]) -> tuple[Kind, dict[str, Any]]:
        """A Messages body becomes the chat body vLLM's Anthropic serving makes of it."""
        if kind != "messages":
            return kind, body
        if self._chat is None:
            raise OrchestratorError(ErrorCode.PROVIDER_UNAVAILABLE, "The engine is not started.")
        try:
            messages = AnthropicMessagesRequest.model_validate({**body, "model": self.spec.name, "stream": False})
            return "chat", self._chat.chat_body(messages)
        except ValidationError as exc:
            raise OrchestratorError.from_validation(exc) from None
        except ValueError as exc:
            raise self._map(exc) from None

    def _served_name(self, body: dict[str, Any]) -> str:
        """The name vLLM runs the request under: a LoRA adapter this engine holds, else the base."""
        name = body.get("model")
        held = self._models.lora_requests if self._models is not None else {}
        return name if isinstance(name, str) and name in held else self.spec.name

    def _request(self, kind: Kind, body: dict[str, Any], request_id: str, stream: bool) -> Any:
        served = self._served_name(body)
        kind, body = self._chat_body(kind, body)
        body = strict_forced_tools(body)
        cls = ChatCompletionRequest if kind == "chat" else CompletionRequest
        data = {**body, "model": served, "request_id": request_id, "stream": stream}
        if stream:
            # Usage on every chunk lets the stream carry a running usage trailer, so a
            # stream cut short is still billed for what it produced.
            options = body.get("stream_options") or {}
            data["stream_options"] = {**options, "include_usage": True, "continuous_usage_stats": True}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise OrchestratorError.from_validation(exc) from None
        except ValueError as exc:  # vLLM's own checks raise VLLMValidationError (a ValueError)
            raise self._map(exc) from None

    async def _call(self, kind: Kind, request: Any) -> Any:
        if self._llm is None:
            raise OrchestratorError(ErrorCode.PROVIDER_UNAVAILABLE, "The engine is not started.")
        try:
            if kind != "completion":
                result = await self._chat.create_chat_completion(request, raw_request=None)
            else:
                result = await self._completion.create_completion(request, raw_request=None)
        except OrchestratorError:
            raise
        except Exception as exc:  # vLLM raises most input errors rather than returning them
            raise self._map(exc) from None
        if isinstance(result, ErrorResponse):
            raise map_engine_error(int(result.error.code), result.error.message, result.error.param)
        return result

    def _map(self, exc: Exception) -> OrchestratorError:
        response = AnthropicServingMessages.create_error_response(exc)
        if response.error.code >= 500:
            logger.exception("engine failure for %s", self.spec.name, exc_info=exc)
        return map_engine_error(int(response.error.code), response.error.message, response.error.param)

    async def _embed(self, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        if self._embedder is None:
            raise OrchestratorError(ErrorCode.PROVIDER_UNAVAILABLE, f"Model {self.spec.name} embeds nothing.")
        try:
            return await self._embedder.embed(body, request_id)
        except ValidationError as exc:
            raise OrchestratorError.from_validation(exc) from None
        except OrchestratorError:
            raise
        except Exception as exc:  # vLLM raises its input errors (ValueError) here
            raise self._map(exc) from None

    async def complete(self, kind: Kind, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        if kind == "embedding":
            return await self._embed(body, request_id)
        result = await self._call(kind, self._request(kind, body, request_id, stream=False))
        data: dict[str, Any] = result.model_dump(mode="json", exclude_none=True)
        data["id"] = f"gen-{request_id}"
        complete_usage(data.setdefault("usage", {}))
        return data

    async def stream(self, kind: Kind, body: dict[str, Any], request_id: str) -> AsyncIterator[str]:
        frames = await self._call(kind, self._request(kind, body, request_id, stream=True))
        old, new = _ID_PREFIX[kind] + request_id, "gen-" + request_id
        client_wants_usage = bool((body.get("stream_options") or {}).get("continuous_usage_stats"))
        n = int(body.get("n") or 1)
        choices = ChoiceUsage(n) if n > 1 or prompt_count(body.get("prompt")) > 1 else None
        try:
            async for frame in frames:
                if frame.startswith("data: [DONE]"):
                    break
                error = error_from_frame(frame)
                if error is not None:
                    raise error
                frame = frame.replace(old, new, 1)
                if is_usage_frame(frame):
                    frame = patch_usage_frame(frame)
                else:
                    stripped, usage = split_usage(frame)
                    if usage is not None:
                        # With n > 1 vLLM's running usage is per choice: sum the choices,
                        # so a cut-short stream is billed for all of them.
                        yield usage_trailer(usage if choices is None else choices.add(frame, usage))
                        if not client_wants_usage:
                            frame = stripped
                yield frame
        finally:
            # Closing vLLM's generator cancels its engine generator, which aborts the request.
            await frames.aclose()

    async def count_tokens(self, body: dict[str, Any]) -> int:
        if self._chat is None:
            raise OrchestratorError(ErrorCode.PROVIDER_UNAVAILABLE, "The engine is not started.")
        try:
            result = await self._chat.count_tokens(AnthropicCountTokensRequest.model_validate(body))
        except ValidationError as exc:
            raise OrchestratorError.from_validation(exc) from None
        except Exception as exc:
            raise self._map(exc) from None
        if isinstance(result, ErrorResponse):
            raise map_engine_error(int(result.error.code), result.error.message, result.error.param)
        return int(result.input_tokens)

    async def tokens(self, op: TokensOp, body: dict[str, Any]) -> dict[str, Any]:
        if self._tokenization is None:
            raise OrchestratorError(ErrorCode.PROVIDER_UNAVAILABLE, "The engine is not started.")
        body = {**body, "model": self.spec.name}
        try:
            if op == "detokenize":
                request: Any = DetokenizeRequest.model_validate(body)
                self._check_vocabulary(request.tokens)
                result = await self._tokenization.create_detokenize(request, raw_request=None)
            else:
                cls = TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest
                result = await self._tokenization.create_tokenize(cls.model_validate(body), raw_request=None)
        except ValidationError as exc:
            raise OrchestratorError.from_validation(exc) from None
        except OrchestratorError:
            raise
        except Exception as exc:  # vLLM's own checks raise VLLMValidationError (a ValueError)
            raise self._map(exc) from None
        if isinstance(result, ErrorResponse):
            raise map_engine_error(int(result.error.code), result.error.message, result.error.param)
        answer: dict[str, Any] = result.model_dump(mode="json")
        return answer

    def _check_vocabulary(self, tokens: list[int]) -> None:
        size = len(self._tokenization.renderer.get_tokenizer())
        unknown = next((t for t in tokens if t >= size), None)
        if unknown is not None:
            raise OrchestratorError(
                ErrorCode.INVALID_REQUEST,
                f"Token id {unknown} is not in the vocabulary of {self.spec.name} (ids 0 to {size - 1}).",
                param="tokens",
            )

    async def load_adapter(self, name: str, path: str) -> None:
        if self._models is None:
            raise OrchestratorError(ErrorCode.PROVIDER_UNAVAILABLE, "The engine is not started.")
        request = LoadLoRAAdapterRequest(lora_name=name, lora_path=path)
        result = await self._models.load_lora_adapter(request, base_model_name=self.spec.name)
        if isinstance(result, ErrorResponse):
            raise map_engine_error(int(result.error.code), result.error.message, result.error.param)

    async def unload_adapter(self, name: str) -> None:
        if self._models is None or name not in self._models.lora_requests:
            return
        lora_id = self._models.lora_requests[name].lora_int_id
        await self._models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
        # vLLM's unload only forgets the name; the worker frees the weights on remove_lora.
        await self._llm.remove_lora(lora_id)

    async def check_health(self) -> None:
        if self._llm is None:
            raise RuntimeError("engine not started")
        await self._llm.check_health()

    def num_unfinished_requests(self) -> int:
        return int(self._llm.get_num_unfinished_requests()) if self._llm is not None else 0

    def load(self) -> EngineLoad:
        # The frontend's unfinished count is exact; the scheduler's figures are from its last
        # step (stale once it idles), so they are bounded by it.
        unfinished = self.num_unfinished_requests()
        running = min(self._scheduler.running, unfinished)
        kv = self._scheduler.kv_cache_usage if unfinished else 0.0
        return EngineLoad(waiting=unfinished - running, running=running, kv_cache_usage=kv, capacity=self._capacity)

    async def shutdown(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            self._chat = self._completion = self._tokenization = self._embedder = None
            # shutdown() blocks for up to ~5 s while worker processes stop.
            await asyncio.to_thread(llm.shutdown)
