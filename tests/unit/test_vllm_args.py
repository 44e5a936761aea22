from __future__ import annotations

import dataclasses

import pytest

from orchestrator.engine.vllm_args import engine_arg_names

pytestmark = pytest.mark.engine


def test_known_names_present() -> None:
    names = engine_arg_names()
    assert {"dtype", "max_num_seqs", "enforce_eager", "enable_log_requests"} <= names
    assert "max_num_seq" not in names


def test_source_parse_matches_vllm_dataclass_fields() -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    assert engine_arg_names() == {f.name for f in dataclasses.fields(AsyncEngineArgs)}
