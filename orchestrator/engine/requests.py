"""Pure helpers that adapt a request body for vLLM's serving layer. No vllm import."""

from __future__ import annotations

from typing import Any


def strict_forced_tools(body: dict[str, Any]) -> dict[str, Any]:
    """A request that must call a tool (``tool_choice`` ``required`` or a named function) gets
    its arguments decoded under each tool's schema: vLLM pins argument schemas only for tools
    marked ``strict`` (its default tool strict level), and a forced call whose arguments miss
    the schema is useless to the client. A tool the client marked ``strict: false`` stays so."""
    choice = body.get("tool_choice")
    if not body.get("tools") or not (choice == "required" or isinstance(choice, dict)):
        return body
    tools = []
    for tool in body["tools"]:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and function.get("strict") is None:
            tool = {**tool, "function": {**function, "strict": True}}
        tools.append(tool)
    return {**body, "tools": tools}
