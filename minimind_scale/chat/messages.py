"""One raw chat record -> validated message dicts and the tool schemas it declares.

`normalize_messages` accepts the shapes chat datasets come in (MiniMind's `conversations`, HF's
`messages`, tools on the system turn or at the record's top level, tool calls and tools as JSON text)
and returns one clean shape, or raises `RecordError` with a dotted field path (`conversations[2].content`)
for anything malformed, so a bad record is reported where it is and never reaches the template.
"""

from __future__ import annotations

import json
from typing import Any

from minimind_scale.chat.markup import CONTROL_MARKERS
from minimind_scale.errors import RecordError

ROLES = ("system", "user", "assistant", "tool")


def _parse_json_list(value: Any, field: str, what: str) -> list:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RecordError(field, f"{what} is not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(value, list):
        raise RecordError(field, f"{what} must be a list (or a JSON string of one), got {type(value).__name__}")
    return value


def _checked_tools(value: Any, field: str) -> list | None:
    # None / "" is how heterogeneous datasets (and Arrow-filled columns) spell "no tools".
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    tools = _parse_json_list(value, field, "tools")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise RecordError(f"{field}[{i}]", f"each tool must be an object, got {type(tool).__name__}")
    return tools or None


def _checked_tool_calls(value: Any, field: str) -> list | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    calls = _parse_json_list(value, field, "tool_calls")
    for i, call in enumerate(calls):
        if not isinstance(call, dict):
            raise RecordError(f"{field}[{i}]", f"each tool call must be an object, got {type(call).__name__}")
        # The template reads `function.name` when a `function` wrapper exists (OpenAI style), else `name`.
        target = call.get("function") if call.get("function") else call
        if not isinstance(target, dict) or not isinstance(target.get("name"), str) or not target["name"]:
            raise RecordError(f"{field}[{i}]", "tool call needs a non-empty string `name` (or `function.name`)")
    return calls or None


def _check_no_markers(text: str, field: str) -> None:
    # A literal turn marker inside a message would be tokenised as the special token and open or close a
    # turn the record never meant to, silently corrupting both the rendering and the labels.
    for marker in CONTROL_MARKERS:
        if marker in text:
            raise RecordError(field, f"contains the chat control marker {marker!r}")

# The record keys a conversation is read from, in order of preference: MiniMind's, then HF's.
CONVERSATION_KEYS = ("conversations", "messages")


def normalize_messages(record: dict, key: str | None = None,
                       require_assistant: bool = True) -> tuple[list[dict], list | None]:
    """Validate one record's conversation and return (messages, tools).

    `key` forces which list to read (e.g. "chosen"/"rejected" for DPO); by default `conversations`,
    falling back to `messages`. Tools may sit on the system turn (MiniMind style) or at the record's
    top level (`tools`, common HF style); they are removed from the messages and returned apart.
    `require_assistant` false accepts a conversation without an assistant turn (a prompt).
    """
    if not isinstance(record, dict):
        raise RecordError("record", f"must be a JSON object, got {type(record).__name__}")
    if key is None:
        key = next((k for k in CONVERSATION_KEYS if k in record), None)
        if key is None:
            raise RecordError("conversations", "missing (the record has neither 'conversations' nor 'messages')")
    elif key not in record:
        raise RecordError(key, "missing")

    raw = record[key]
    if not isinstance(raw, list):
        raise RecordError(key, f"must be a list of messages, got {type(raw).__name__}")
    if not raw:
        raise RecordError(key, "is empty")

    tools = _checked_tools(record.get("tools"), "tools")
    messages: list[dict] = []
    for i, item in enumerate(raw):
        msg, turn_tools = _message(item, i, f"{key}[{i}]")
        if turn_tools is not None:
            if tools is not None:
                raise RecordError(f"{key}[{i}].tools", "tools given both here and at the record's top level")
            tools = turn_tools
        messages.append(msg)
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise RecordError(key, "has no assistant turn (nothing to learn)")
    return messages, tools


def _message(item: Any, i: int, path: str) -> tuple[dict, list | None]:
    """One validated message of a conversation, and the tools its system turn declares (or None)."""
    if not isinstance(item, dict):
        raise RecordError(path, f"must be an object, got {type(item).__name__}")
    role = item.get("role")
    if role is None:
        raise RecordError(f"{path}.role", "missing")
    if role not in ROLES:
        raise RecordError(f"{path}.role", f"must be one of {'|'.join(ROLES)}, got {role!r}")
    if role == "system" and i != 0:
        raise RecordError(f"{path}.role", "a system turn is only allowed as the first message")

    content = item.get("content")
    if content is None:
        raise RecordError(f"{path}.content", "missing")
    if not isinstance(content, str):
        raise RecordError(f"{path}.content", f"must be a string, got {type(content).__name__}")
    _check_no_markers(content, f"{path}.content")
    msg: dict = {"role": role, "content": content}

    reasoning = item.get("reasoning_content")
    if reasoning is not None:
        if not isinstance(reasoning, str):
            raise RecordError(f"{path}.reasoning_content", f"must be a string, got {type(reasoning).__name__}")
        _check_no_markers(reasoning, f"{path}.reasoning_content")
        msg["reasoning_content"] = reasoning

    calls = item.get("tool_calls")
    if calls is not None:
        calls = _checked_tool_calls(calls, f"{path}.tool_calls")
        if calls and role != "assistant":
            raise RecordError(f"{path}.tool_calls", f"only assistant turns may call tools, not {role}")
        if calls:
            msg["tool_calls"] = calls

    turn_tools = item.get("tools")
    if turn_tools is not None:
        if role != "system":
            raise RecordError(f"{path}.tools", "tools belong on the system turn")
        turn_tools = _checked_tools(turn_tools, f"{path}.tools")

    # An empty system prompt is normal (tool-only records); an assistant turn that only calls
    # tools has nothing else to say. Any other empty turn is a broken record.
    if content == "" and role != "system" and not (role == "assistant" and "tool_calls" in msg):
        raise RecordError(f"{path}.content", f"empty {role} turn")
    return msg, turn_tools
