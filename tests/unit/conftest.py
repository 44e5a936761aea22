from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.catalog import Catalog, load_catalog

TINY = {
    "name": "tiny-a",
    "aliases": ["a"],
    "backend_id": "org/tiny-a",
    "source": {"kind": "tiny_random", "seed": 1},
    "context_window": 512,
    "engine_args": {"dtype": "float32"},
    "pricing": {"input_per_million": "1.5", "output_per_million": "2"},
}


def write_catalog(folder: Path, *entries: dict) -> Path:
    path = folder / "catalog.yaml"
    path.write_text(yaml.safe_dump({"models": list(entries)}))
    return path


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    other = {**TINY, "name": "tiny-b", "aliases": ["b"], "backend_id": "org/tiny-b"}
    return load_catalog([write_catalog(tmp_path, TINY, other)])
