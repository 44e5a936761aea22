"""The router never imports vllm; the HTTP edge imports neither ray nor vllm; serving does not
import the status command (the command depends on serving, lazily, not the other way)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("orchestrator.serving.router", ["vllm"]),
        ("orchestrator.serving", ["vllm"]),
        ("orchestrator.serving.cluster", ["vllm", "orchestrator.status"]),
        ("orchestrator.api", ["vllm", "ray"]),
        ("orchestrator.gateway", ["vllm", "ray", "fastapi"]),
    ],
)
def test_module_does_not_import(module: str, forbidden: list[str]) -> None:
    code = f"import sys, {module}; print(','.join(m for m in {forbidden!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"
