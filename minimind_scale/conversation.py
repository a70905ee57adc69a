"""Chat records -> validated messages -> token ids with assistant-only labels.

`normalize_messages` turns one raw record into clean message dicts (raising `RecordError` with a
dotted field path for anything malformed); `encode_chat` renders them with the tokenizer's own chat
template and labels every assistant turn; `encode_prompt` renders a prompt for generation.
"""

from __future__ import annotations

import json
from bisect import bisect_left, bisect_right
from typing import Any

from .errors import RecordError
from .rows import IGNORE_INDEX

ROLES = ("system", "user", "assistant", "tool")
ASSISTANT_HEADER = "<|im_start|>assistant\n"
TURN_END = "<|im_end|>"
# Literal ChatML control markers inside a turn would be parsed as special tokens and open or close
# turns the record never meant to, which silently corrupts both the rendering and the labels.
CONTROL_MARKERS = ("<|im_start|>", "<|im_end|>")


def _parse_json_list(value: Any, field: str, what: str) -> list:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RecordError(field, f"{what} is not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(value, list):
        raise RecordError(field, f"{what} must be a list (or a JSON string of one), got {type(value).__name__}")
    return value


def _parse_tools(value: Any, field: str) -> list | None:
    # None / "" is how heterogeneous datasets (and Arrow-filled columns) spell "no tools".
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    tools = _parse_json_list(value, field, "tools")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise RecordError(f"{field}[{i}]", f"each tool must be an object, got {type(tool).__name__}")
    return tools or None


def _parse_tool_calls(value: Any, field: str) -> list | None:
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
    for marker in CONTROL_MARKERS:
        if marker in text:
            raise RecordError(field, f"contains the chat control marker {marker!r}")


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
        if "conversations" in record:
            key = "conversations"
        elif "messages" in record:
            key = "messages"
        else:
            raise RecordError("conversations", "missing (the record has neither 'conversations' nor 'messages')")
    elif key not in record:
        raise RecordError(key, "missing")

    raw = record[key]
    if not isinstance(raw, list):
        raise RecordError(key, f"must be a list of messages, got {type(raw).__name__}")
    if not raw:
        raise RecordError(key, "is empty")

    tools = _parse_tools(record.get("tools"), "tools")
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
        calls = _parse_tool_calls(calls, f"{path}.tool_calls")
        if calls and role != "assistant":
            raise RecordError(f"{path}.tool_calls", f"only assistant turns may call tools, not {role}")
        if calls:
            msg["tool_calls"] = calls

    turn_tools = item.get("tools")
    if turn_tools is not None:
        if role != "system":
            raise RecordError(f"{path}.tools", "tools belong on the system turn")
        turn_tools = _parse_tools(turn_tools, f"{path}.tools")

    # An empty system prompt is normal (tool-only records); an assistant turn that only calls
    # tools has nothing else to say. Any other empty turn is a broken record.
    if content == "" and role != "system" and not (role == "assistant" and "tool_calls" in msg):
        raise RecordError(f"{path}.content", f"empty {role} turn")
    return msg, turn_tools


def _render(messages: list[dict], tools: list | None, tokenizer, **kwargs) -> str:
    if tools is not None:
        kwargs["tools"] = tools
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def assistant_char_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of every assistant reply in a rendered ChatML string.

    Each span starts right after `<|im_start|>assistant\\n` and ends after the closing `<|im_end|>`
    plus its newline (or right after `<|im_end|>` when the text stops there).
    """
    spans = []
    pos = text.find(ASSISTANT_HEADER)
    while pos != -1:
        start = pos + len(ASSISTANT_HEADER)
        close = text.find(TURN_END, start)
        if close == -1:
            raise ValueError("chat template left an assistant turn without a closing <|im_end|>")
        end = close + len(TURN_END)
        if text.startswith("\n", end):
            end += 1
        spans.append((start, end))
        pos = text.find(ASSISTANT_HEADER, end)
    return spans


def encode_chat(messages: list[dict], tools: list | None, tokenizer, max_seq_len: int) -> dict:
    """Render and tokenize one conversation; labels copy input_ids on assistant replies, -100 elsewhere.

    Labels are aligned with input_ids (not shifted). Both are truncated to `max_seq_len`, keeping the
    prefix.
    """
    text = _render(messages, tools, tokenizer)
    spans = assistant_char_spans(text)
    n_assistant = sum(1 for m in messages if m["role"] == "assistant")
    if len(spans) != n_assistant:
        raise ValueError(
            f"rendered text has {len(spans)} assistant headers for {n_assistant} assistant turns; "
            "the chat template is not ChatML-shaped"
        )

    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    input_ids = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    # Starts and ends are each non-decreasing (byte-level pieces of one character share offsets),
    # so a span's tokens are found by bisection instead of a per-token Python loop.
    starts = [s for s, _ in offsets]
    ends = [e for _, e in offsets]
    labels = [IGNORE_INDEX] * len(input_ids)
    for a, b in spans:
        # A token is labelled iff all of its characters lie inside [a, b): one straddling either
        # boundary is left out rather than half-learned.
        lo = bisect_left(starts, a)
        hi = bisect_right(ends, b)
        if hi > lo:
            labels[lo:hi] = input_ids[lo:hi]

    return {"input_ids": input_ids[:max_seq_len], "labels": labels[:max_seq_len]}


def encode_prompt(messages: list[dict], tools: list | None, tokenizer, **template_kwargs) -> list[int]:
    """Token ids of the conversation followed by the assistant generation prompt.

    Extra keyword arguments go to the chat template (MiniMind's reads `open_thinking`).
    """
    text = _render(messages, tools, tokenizer, add_generation_prompt=True, **template_kwargs)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
