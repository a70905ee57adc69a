"""Chat records -> validated messages -> token ids with assistant-only labels.

`normalize_messages` turns one raw record into clean message dicts (raising `RecordError` with a
dotted field path for anything malformed); `encode_chat` renders them with the tokenizer's own chat
template and labels every assistant turn; `encode_prompt` renders a prompt for generation.
`encode_chats` and `encode_prompts` do the same for a list of conversations, equal item by item, with
one tokenizer call for the whole list (what data preparation uses).

Rendering is always the tokenizer's own chat template, once per conversation. For the two MiniMind
templates (the shared tokenizer's and the packaged one), recognised by their exact text, a Python port
renders instead of jinja, about 30 times faster; it handles only inputs it renders identically (anything
else goes to `apply_chat_template`), and tests/test_batched_encode.py proves it equal to
`apply_chat_template` on every shared and test data set and on generated conversations.
"""

from __future__ import annotations

import hashlib
import json
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from typing import Any

from minimind_scale.data.rows import IGNORE_INDEX
from minimind_scale.errors import RecordError

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


def render_chat(messages: list[dict], tools: list | None, tokenizer, **template_kwargs) -> str:
    """The conversation rendered by the tokenizer's chat template: `apply_chat_template(tokenize=False)`,
    or its Python port where the template is one of `PORTED_TEMPLATES` and the input is one it renders
    identically. Keyword arguments go to the template (`add_generation_prompt`, `open_thinking`)."""
    template = getattr(tokenizer, "chat_template", None)
    port = None
    if isinstance(template, str):
        port = _PORTS.get(template)
        if port is None and template not in _NOT_PORTED:
            port = _find_port(template)
    if port is not None and template_kwargs.keys() <= _PORT_KWARGS and _portable(messages, tools):
        return port(messages, tools, **template_kwargs)
    if tools is not None:
        template_kwargs["tools"] = tools
    return tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs)


_render = render_chat  # the former private name


_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
               "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
               "<args-json-object>}\n</tool_call><|im_end|>\n")


def _tojson(value: Any) -> str:
    # transformers' `tojson` filter (chat_template_utils): json.dumps without ASCII or HTML escaping.
    return json.dumps(value, ensure_ascii=False)


def _render_minimind(messages: list[dict], tools: list | None, add_generation_prompt: bool = False,
                     open_thinking: Any = None) -> str:
    """MiniMind's chat template (both the shared tokenizer's and the packaged one render alike), in Python.
    Only for inputs `_portable` accepts; equal to the template on them (tests/test_batched_encode.py)."""
    out = []
    first = messages[0]
    if tools:
        out.append("<|im_start|>system\n")
        if first["role"] == "system":
            out.append(first["content"] + "\n\n")
        out.append(_TOOLS_HEAD)
        for tool in tools:
            out.append("\n" + _tojson(tool))
        out.append(_TOOLS_TAIL)
    elif first["role"] == "system":
        out.append("<|im_start|>system\n" + first["content"] + "<|im_end|>\n")
    last = len(messages) - 1
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "user" or (role == "system" and i):
            out.append("<|im_start|>" + role + "\n" + content + "<|im_end|>\n")
        elif role == "assistant":
            thought = message.get("reasoning_content")
            if not isinstance(thought, str):
                thought = ""
                if "</think>" in content:
                    pieces = content.split("</think>")
                    thought = pieces[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                    content = pieces[-1].lstrip("\n")
            out.append("<|im_start|>assistant\n<think>\n" + thought.strip("\n") + "\n</think>\n\n"
                       + content.lstrip("\n"))
            for k, call in enumerate(message.get("tool_calls") or ()):
                if content or k:
                    out.append("\n")
                fn = call["function"] if call.get("function") else call
                args = fn["arguments"]
                out.append('<tool_call>\n{"name": "' + fn["name"] + '", "arguments": '
                           + (args if isinstance(args, str) else _tojson(args)) + "}\n</tool_call>")
            out.append("<|im_end|>\n")
        elif role == "tool":
            if i == 0 or messages[i - 1]["role"] != "tool":
                out.append("<|im_start|>user")
            out.append("\n<tool_response>\n" + content + "\n</tool_response>")
            if i == last or messages[i + 1]["role"] != "tool":
                out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n<think>\n" if open_thinking is True
                   else "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    return "".join(out)


# sha256 of a chat template's exact text -> its Python port.
PORTED_TEMPLATES: dict[str, Callable[..., str]] = {
    # ../shared/tokenizers/minimind (MiniMind's tokenizer_config.json)
    "97c6a9ef3f8d35044f435bb7773f1af160a7328ab6e8d2e9d67702941320a711": _render_minimind,
    # minimind_scale/assets/tokenizer (the packaged default)
    "80fcb3e3fabdc22d2bd1d2fd7fa2cbb930d3ad617d8c11bb1165a89ac94ba4f0": _render_minimind,
}
_PORT_KWARGS = frozenset({"add_generation_prompt", "open_thinking"})
_PORTS: dict[str, Callable[..., str]] = {}  # template text -> port, filled on first sight of a template
_NOT_PORTED: set[str] = set()
_MESSAGE_KEYS = frozenset({"role", "content", "reasoning_content", "tool_calls"})


def _find_port(template: str) -> Callable[..., str] | None:
    port = PORTED_TEMPLATES.get(hashlib.sha256(template.encode()).hexdigest())
    if port is None:
        _NOT_PORTED.add(template)
    else:
        _PORTS[template] = port
    return port


def _portable(messages: Any, tools: Any) -> bool:
    """Whether the port renders these exactly as the template does: the shapes `normalize_messages` returns
    (plain str/list/dict values, the four roles, tool calls with a string name and an `arguments`)."""
    if tools is not None and not (type(tools) is list and all(type(t) is dict for t in tools)):
        return False
    if type(messages) is not list or not messages:
        return False
    for m in messages:
        if type(m) is not dict or not m.keys() <= _MESSAGE_KEYS or m.get("role") not in ROLES \
                or type(m.get("content")) is not str:
            return False
        thought = m.get("reasoning_content")
        if thought is not None and type(thought) is not str:
            return False
        calls = m.get("tool_calls")
        if calls is None:
            continue
        if type(calls) is not list:
            return False
        for call in calls:
            if type(call) is not dict:
                return False
            fn = call["function"] if call.get("function") else call
            if type(fn) is not dict or type(fn.get("name")) is not str or "arguments" not in fn:
                return False
    return True


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


def _checked_spans(text: str, messages: list[dict]) -> list[tuple[int, int]]:
    spans = assistant_char_spans(text)
    n_assistant = sum(1 for m in messages if m["role"] == "assistant")
    if len(spans) != n_assistant:
        raise ValueError(
            f"rendered text has {len(spans)} assistant headers for {n_assistant} assistant turns; "
            "the chat template is not ChatML-shaped"
        )
    return spans


def encode_chats(conversations: Sequence[tuple[list[dict], list | None]], tokenizer, max_seq_len: int,
                 texts: Sequence[str] | None = None) -> list[dict]:
    """`encode_chat` of each (messages, tools), equal item by item: each is rendered once, and all are
    tokenised in one call. A token's label is decided from its character offsets as in `encode_chat`, found
    by bisection over the tokenizer's own encodings, so no per-token offset list is built in Python.
    `texts`: the conversations already rendered (and perhaps rewritten), one per conversation."""
    if not conversations:
        return []
    if texts is None:
        texts = [render_chat(messages, tools, tokenizer) for messages, tools in conversations]
    elif len(texts) != len(conversations):
        raise ValueError(f"{len(texts)} texts for {len(conversations)} conversations")
    spans = [_checked_spans(text, messages) for text, (messages, _) in zip(texts, conversations)]
    encodings = _backend_encodings(tokenizer, texts)
    if encodings is None:
        batch = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)
        encodings = getattr(batch, "encodings", None)
    if encodings is None:  # not a fast tokenizer: no encodings to query, so one conversation at a time
        return [encode_chat(messages, tools, tokenizer, max_seq_len, text)
                for (messages, tools), text in zip(conversations, texts)]
    out = []
    for encoding, turn_spans in zip(encodings, spans):
        ids = encoding.ids
        labels = _assistant_labels(ids, encoding, turn_spans)
        out.append({"input_ids": ids[:max_seq_len], "labels": labels[:max_seq_len]})
    return out


def _backend_encodings(tokenizer, texts: Sequence[str]) -> list | None:
    """The Rust tokenizer's encodings of `texts`, called directly: the same call `tokenizer(texts,
    add_special_tokens=False)` makes, without transformers' conversion of every encoding into Python
    lists (about a tenth of the tokenising time). Only while the backend has no truncation or padding
    set, which transformers would otherwise reset for an untruncated call; None for anything else."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or any(getattr(backend, state, True) is not None for state in ("truncation", "padding")):
        return None
    return backend.encode_batch(list(texts), add_special_tokens=False)


def _assistant_labels(ids: list[int], encoding, spans: list[tuple[int, int]]) -> list[int]:
    """encode_chat's labels from a tokenizers Encoding: `bisect_left(starts, a)` and `bisect_right(ends, b)`
    over the token offsets, each offset read from the encoding where bisection looks (a dozen per span)."""
    n = len(ids)

    def start(k: int) -> int:
        return (encoding.token_to_chars(k) or (0, 0))[0]

    def end(k: int) -> int:
        return (encoding.token_to_chars(k) or (0, 0))[1]

    labels = [IGNORE_INDEX] * n
    for a, b in spans:
        lo = bisect_left(range(n), a, key=start)
        hi = bisect_right(range(n), b, key=end)
        if hi > lo:
            labels[lo:hi] = ids[lo:hi]
    return labels


def encode_chat(messages: list[dict], tools: list | None, tokenizer, max_seq_len: int,
                text: str | None = None) -> dict:
    """Render and tokenize one conversation; labels copy input_ids on assistant replies, -100 elsewhere.

    Labels are aligned with input_ids (not shifted). Both are truncated to `max_seq_len`, keeping the
    prefix. `text`: the conversation already rendered (and perhaps rewritten); labels follow its replies.
    """
    if text is None:
        text = render_chat(messages, tools, tokenizer)
    spans = _checked_spans(text, messages)

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
    text = render_chat(messages, tools, tokenizer, add_generation_prompt=True, **template_kwargs)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompts(prompts: Sequence[tuple[list[dict], list | None]], tokenizer,
                   template_kwargs: dict | Sequence[dict] | None = None) -> list[list[int]]:
    """`encode_prompt` of each (messages, tools), equal item by item, tokenised in one call.

    `template_kwargs`: one dict for every prompt, or one per prompt (e.g. each prompt's `open_thinking`).
    """
    if not prompts:
        return []
    if template_kwargs is None or isinstance(template_kwargs, dict):
        template_kwargs = [template_kwargs or {}] * len(prompts)
    if len(template_kwargs) != len(prompts):
        raise ValueError(f"{len(template_kwargs)} template_kwargs for {len(prompts)} prompts")
    texts = [render_chat(messages, tools, tokenizer, add_generation_prompt=True, **kwargs)
             for (messages, tools), kwargs in zip(prompts, template_kwargs)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
