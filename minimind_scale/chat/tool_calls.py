"""Tool calls as a model writes them, and the tool schemas a conversation declares.

`parse_tool_calls` reads every tool-call block of a reply (`<tool_call>{"name": ..., "arguments":
{...}}</tool_call>`) into a `ParsedCall`, keeping a malformed one with the reason it is unusable, so
that it can be answered with an error observation and counted as a failure. `tool_schemas`,
`declared_tool_names` and `required_arguments` read the OpenAI function schemas a sample declares.
Pure text handling: running the tools is `agent.tools`' job.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from minimind_scale.chat.markup import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

TOOL_CALL_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + "(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ParsedCall:
    """One tool-call block. `error` says why it is not a usable call (then name/arguments are what could
    be read); a well-formed call has a string name and a dict of arguments."""

    name: str | None
    arguments: Any
    error: str | None = None

    def as_dict(self) -> dict:
        out = {"name": self.name, "arguments": self.arguments}
        if self.error is not None:
            out["error"] = self.error
        return out


def _parse_one(block: str) -> ParsedCall:
    try:
        call = json.loads(block)
    except json.JSONDecodeError as e:
        return ParsedCall(None, None, f"the tool call is not valid JSON ({e.msg} at char {e.pos})")
    if not isinstance(call, dict):
        return ParsedCall(None, None, f"the tool call must be a JSON object, got {type(call).__name__}")
    target = call["function"] if isinstance(call.get("function"), dict) else call  # OpenAI's wrapper
    name, arguments = target.get("name"), target.get("arguments", {})
    if not isinstance(name, str) or not name:
        return ParsedCall(None, arguments, "the tool call has no \"name\"")
    return ParsedCall(name, *parse_arguments(arguments))


def parse_arguments(arguments: Any) -> tuple[Any, str | None]:
    """(arguments, error): a call's arguments as an object, from an object or the JSON text of one (OpenAI
    style); missing or null arguments are an empty object. `error` is None when they are usable."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            return arguments, f"the arguments are not valid JSON ({e.msg} at char {e.pos})"
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return arguments, f"the arguments must be a JSON object, got {type(arguments).__name__}"
    return arguments, None


def parse_tool_calls(text: str) -> list[ParsedCall]:
    """Every tool-call block of `text` with its JSON, in order; a malformed one is kept, with its error, so
    it is answered with an error observation and counted as a failure."""
    return [_parse_one(block.strip()) for block in TOOL_CALL_BLOCK.findall(text)]


def tool_schemas(tools: Any) -> dict[str, dict]:
    """name -> function schema (`{"name", "parameters", ...}`) of a list of OpenAI tool schemas, the JSON
    text of one, or None. Entries without a name are ignored."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError:
            return {}
    out: dict[str, dict] = {}
    for tool in tools if isinstance(tools, list) else []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out[fn["name"]] = fn
    return out


def declared_tool_names(tools: Any) -> set[str]:
    """The names a sample's tool schemas declare (empty without schemas): the tools it may call."""
    return set(tool_schemas(tools))


def required_arguments(schema: dict) -> list[str]:
    """The `required` parameters of one function schema."""
    params = schema.get("parameters")
    required = params.get("required") if isinstance(params, dict) else None
    return [r for r in required if isinstance(r, str)] if isinstance(required, list) else []
