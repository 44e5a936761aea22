from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from orchestrator.catalog import Catalog, CatalogError, LocalSource, load_catalog
from orchestrator.errors import ErrorCode, OrchestratorError
from tests.unit.conftest import TINY, write_catalog

REPO = Path(__file__).resolve().parents[2]


def problems(tmp_path: Path, *entries: dict, names: set[str] | None = None) -> list[str]:
    with pytest.raises(CatalogError) as info:
        load_catalog([write_catalog(tmp_path, *entries)], engine_arg_names=names)
    return [str(p) for p in info.value.problems]


def test_loads_entry_with_decimal_prices(catalog: Catalog) -> None:
    spec = catalog.resolve("tiny-a")
    assert spec.pricing.input_per_million == Decimal("1.5")
    assert spec.deployment_name == "model-tiny-a"


@pytest.mark.parametrize("name", ["tiny-a", "a", "org/tiny-a", "TINY-A"])
def test_display_alias_and_backend_id_resolve(catalog: Catalog, name: str) -> None:
    assert catalog.resolve(name).name == "tiny-a"


def test_unknown_model_is_model_not_found(catalog: Catalog) -> None:
    with pytest.raises(OrchestratorError) as info:
        catalog.resolve("nope")
    assert info.value.code is ErrorCode.MODEL_NOT_FOUND and info.value.param == "model"


def test_spec_is_frozen(catalog: Catalog) -> None:
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError on frozen set
        catalog.resolve("a").name = "x"  # type: ignore[misc]


def test_unknown_key_reported_with_file_and_field(tmp_path: Path) -> None:
    found = problems(tmp_path, {**TINY, "contxt_window": 5})
    assert any("models.0.contxt_window" in p and "catalog.yaml" in p for p in found)


def test_every_problem_is_reported(tmp_path: Path) -> None:
    bad = {**TINY, "name": "bad", "context_window": 1, "pricing": {"input_per_million": "-1"}}
    dup = {**TINY, "name": "dup", "backend_id": "org/dup", "aliases": ["a"]}
    found = problems(tmp_path, TINY, bad, dup)
    joined = "\n".join(found)
    assert "models.1.context_window" in joined
    assert "models.1.pricing.input_per_million" in joined
    assert "models.2.aliases.0: name 'a' already used by model 'tiny-a' (" in joined


def test_duplicate_names_and_deployment_names_are_refused(tmp_path: Path) -> None:
    same = {**TINY, "aliases": [], "backend_id": "org/other"}
    found = problems(tmp_path, TINY, same)
    assert any("models.1.name: name 'tiny-a' already used by model 'tiny-a'" in p for p in found), found
    # Across files too, with the first owner's file and entry.
    other = tmp_path / "more"
    other.mkdir()
    (other / "x.yaml").write_text(yaml.safe_dump({"models": [{**TINY, "name": "x", "aliases": ["TINY-A"]}]}))
    with pytest.raises(CatalogError) as info:
        load_catalog([write_catalog(tmp_path, TINY), other])
    assert "x.yaml: models.0.aliases.0: name 'tiny-a' already used by model 'tiny-a' (" in str(info.value)
    assert "catalog.yaml: models.0)" in str(info.value)
    # Display names that differ only where Serve's deployment names replace characters.
    dotted = {**TINY, "name": "tiny.a", "aliases": [], "backend_id": "org/dotted"}
    found = problems(tmp_path, {**TINY, "name": "tiny-a"}, dotted)
    assert any("models.1.name: deployment name 'model-tiny-a' already used by model 'tiny-a'" in p for p in found)
    # An entry repeating its own name (another case) is not a clash.
    assert load_catalog([write_catalog(tmp_path, {**TINY, "aliases": ["TINY-A"]})]).resolve("tiny-a")


def test_engine_arg_typo_fails_with_suggestion(tmp_path: Path) -> None:
    entry = {**TINY, "engine_args": {"max_num_seq": 4}}
    found = problems(tmp_path, entry, names={"max_num_seqs", "dtype"})
    assert any("engine_args.max_num_seq" in p and "max_num_seqs" in p for p in found)


def test_alias_must_be_a_valid_name(tmp_path: Path) -> None:
    found = problems(tmp_path, {**TINY, "aliases": ["ok", "bad name!"]})
    assert any("models.0.aliases.1" in p for p in found)


def test_reserved_engine_args_refused(tmp_path: Path) -> None:
    found = problems(tmp_path, {**TINY, "engine_args": {"max_model_len": 10}})
    assert any("max_model_len" in p for p in found)


def test_gpu_fields_need_gpu_device(tmp_path: Path) -> None:
    found = problems(tmp_path, {**TINY, "resources": {"tensor_parallel_size": 2}})
    assert any("resources" in p and "device: gpu" in p for p in found)


def test_tools_capability_needs_parser(tmp_path: Path) -> None:
    found = problems(tmp_path, {**TINY, "capabilities": {"tools": True}})
    assert any("tool_call_parser" in p for p in found)


def test_autoscaling_bounds_ordered(tmp_path: Path) -> None:
    found = problems(tmp_path, {**TINY, "autoscaling": {"min_replicas": 3, "max_replicas": 2}})
    assert any("min_replicas" in p for p in found)


def test_local_path_relative_to_catalog_file(tmp_path: Path) -> None:
    entry = {**TINY, "source": {"kind": "local", "path": "weights/x"}}
    spec = load_catalog([write_catalog(tmp_path, entry)]).resolve("tiny-a")
    assert isinstance(spec.source, LocalSource)
    assert spec.source.path == tmp_path.resolve() / "weights" / "x"


def test_backend_id_defaults_from_source(tmp_path: Path) -> None:
    entry = {k: v for k, v in TINY.items() if k != "backend_id"}
    entry["source"] = {"kind": "huggingface", "repo": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    spec = load_catalog([write_catalog(tmp_path, entry)]).resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert spec.name == "tiny-a"


def test_invalid_yaml_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(CatalogError) as info:
        load_catalog([path])
    assert "invalid YAML" in str(info.value)


def test_shipped_catalogs_are_valid() -> None:
    catalog = load_catalog([REPO / "catalog"])
    assert {s.name for s in catalog} == {"smollm2-135m-instruct", "tiny-random", "all-minilm-l6-v2", "tiny-vision"}
    embedder = catalog.resolve("minilm")
    # The embedding and vision models wait at zero replicas, so they never delay the chat
    # model's start.
    assert (embedder.task, embedder.autoscaling.min_replicas) == ("embed", 0)
    vision = catalog.resolve("vision")
    assert (vision.capabilities.vision, vision.autoscaling.min_replicas) == (True, 0)
    assert load_catalog([REPO / "deployments" / "gpu-catalog"]).resolve("llama-3.1-70b-instruct")


def test_an_embedding_model_has_no_generation_capabilities(tmp_path: Path) -> None:
    found = problems(tmp_path, {**TINY, "task": "embed", "capabilities": {"tools": True}, "tool_call_parser": "x"})
    assert len(found) == 1 and "an embedding model (task: embed) has no tools" in found[0]
    assert problems(tmp_path, {**TINY, "task": "classify"})
    assert problems(tmp_path, {**TINY, "embedding": {"max_inputs": 0}})


def test_renamed_field_is_explained(tmp_path: Path) -> None:
    found = problems(tmp_path, {**TINY, "autoscaling": {"target_queue_depth": 8}})
    assert [p.split(": ", 1)[1] for p in found] == [
        "models.0.autoscaling.target_queue_depth: renamed: write autoscaling.target_waiting_per_replica instead "
        "(it was Serve's in-flight request target; replicas now scale on the engine's waiting requests)"
    ]


def test_overload_bounds_are_validated(tmp_path: Path) -> None:
    found = problems(tmp_path, {**TINY, "overload": {"max_waiting_per_replica": -1, "request_timeout_s": 0}})
    assert len(found) == 2 and all(": models.0.overload." in p for p in found)
