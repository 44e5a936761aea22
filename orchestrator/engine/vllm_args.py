"""vLLM's own engine-argument names, to check catalog ``engine_args`` against.

The names are read from the installed vLLM's ``engine/arg_utils.py`` source (the fields of
``EngineArgs`` and ``AsyncEngineArgs``) rather than by importing it: the import pulls in
torch and transformers and takes ~10 s, the parse takes ~0.1 s and gives the same set
(tests/unit/test_vllm_args.py compares both where vLLM is installed).
"""

from __future__ import annotations

import ast
import importlib.util
from functools import cache
from pathlib import Path

_CLASSES = ("EngineArgs", "AsyncEngineArgs")


@cache
def engine_arg_names() -> frozenset[str]:
    """Returns the field names of the installed vLLM's ``AsyncEngineArgs``.

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
        if isinstance(node, ast.ClassDef) and node.name in _CLASSES:
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    annotation = ast.unparse(item.annotation)
                    if not annotation.startswith("ClassVar"):
                        names.add(item.target.id)
    return frozenset(names)
