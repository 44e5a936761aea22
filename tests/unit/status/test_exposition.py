"""Reading the orchestrator's series out of a node's Prometheus text."""

from __future__ import annotations

import pytest

from orchestrator.status.exposition import Sample, parse_samples
from tests.unit.status.texts import CONTROLLER, head_text


def test_parse_samples_keeps_orchestrator_series_with_exported_names() -> None:
    samples = parse_samples(head_text(before=False))
    names = {s.name for s in samples}
    assert "ray_orchestrator_completion_tokens_total" in names
    assert "ray_orchestrator_requests_total" in names
    assert "ray_orchestrator_completion_tokens" in names  # the deprecated gauge is parsed, not used
    assert not any(n.startswith(("ray_serve_", "vllm:")) for n in names)
    first = samples[0]
    assert first.name == "ray_orchestrator_model_target_replicas"
    assert first.labels["WorkerId"] == CONTROLLER and first.labels["application"] == "llm"
    assert first.value == 2.0


def test_parse_samples_names_counters_total_also_when_type_line_lacks_it() -> None:
    text = '# TYPE ray_orchestrator_requests counter\nray_orchestrator_requests{model="m",status="500"} 3\n'
    assert parse_samples(text) == [Sample("ray_orchestrator_requests_total", {"model": "m", "status": "500"}, 3.0)]


def test_parse_samples_rejects_broken_text() -> None:
    with pytest.raises(ValueError):
        parse_samples('ray_orchestrator_requests_total{model="m" 3\n')
