"""The router never imports vllm; the HTTP edge imports neither ray nor vllm; the gateway
none of ray, vllm or fastapi; serving does not import the status command, and the status
command loads ray only when it runs; the modules wrapping Ray's and vLLM's internals import
neither until a function is called. Every module of a package is imported, not only its
``__init__``, so a module that nothing imports eagerly is checked too."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Imports `package` and every module under it, then prints the forbidden ones loaded.
_CHECK = """
import importlib, pkgutil, sys
package, forbidden = sys.argv[1], sys.argv[2].split(",")
root = importlib.import_module(package)
names = [package]
if hasattr(root, "__path__"):
    names += [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")]
for name in names:
    importlib.import_module(name)
print(len(names), ",".join(m for m in forbidden if m in sys.modules))
"""


@pytest.mark.parametrize(
    ("package", "forbidden", "at_least"),
    [
        ("orchestrator.serving.router", ["vllm"], 1),
        ("orchestrator.serving", ["vllm", "orchestrator.status"], 9),
        ("orchestrator.status", ["ray", "vllm"], 5),
        ("orchestrator.api", ["vllm", "ray"], 10),
        ("orchestrator.gateway", ["vllm", "ray", "fastapi"], 12),
        ("orchestrator.protocol", ["vllm", "ray", "fastapi"], 2),
        ("orchestrator.ray_internals", ["ray", "vllm"], 1),
        ("orchestrator.vllm_internals", ["vllm", "ray"], 1),
    ],
)
def test_package_does_not_import(package: str, forbidden: list[str], at_least: int) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CHECK, package, ",".join(forbidden)], capture_output=True, text=True, check=True
    )
    count, found = out.stdout.split(" ", 1)
    assert int(count) >= at_least, f"only {count} modules of {package} were imported"
    assert found.strip() == "", f"{package} imports {found.strip()}"


def test_the_gateway_check_imports_the_ledger_and_the_store() -> None:
    listing = "\nprint(sorted(m for m in sys.modules if m.startswith('orchestrator.gateway')))"
    args = [sys.executable, "-c", _CHECK + listing, "orchestrator.gateway", "vllm"]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    assert "'orchestrator.gateway.ledger'" in out.stdout and "'orchestrator.gateway.store'" in out.stdout
