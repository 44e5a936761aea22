"""Engines behind a small protocol; the vLLM engine is the only module importing vllm."""

from orchestrator.engine.base import Engine
from orchestrator.engine.batching import batch_frames

__all__ = ["Engine", "batch_frames"]
