"""The chat template: a conversation rendered as the text a MiniMind-family model reads.

`CHAT_TEMPLATE` is the Jinja template this project's tokenizers carry (`tokenizer_train` writes it into
every tokenizer it trains; the packaged tokenizer holds it). Its rendered text equals MiniMind's template
on every conversation that template accepts, because the assistant-only loss mask and MiniMind's
checkpoints depend on the exact characters. Behaviours kept on purpose:
- tools go into the system turn (after the system text and a blank line), one JSON per line;
- every assistant turn carries a think block, empty or not, and text before a closing think tag in the
  content is moved into that block unless `reasoning_content` is given;
- consecutive `tool` messages are merged into one user turn of tool-response blocks;
- `open_thinking=True` leaves the generation prompt's think block open for the model to fill.

`render_chat` renders with the tokenizer's own template. For the two MiniMind templates (the shared
tokenizer's and the packaged one), recognised by the hash of their exact text, a Python port renders
instead of Jinja, about 30 times faster; it takes only inputs it renders identically (anything else goes
to `apply_chat_template`), and tests/test_batched_encode.py proves it equal to `apply_chat_template` on
every shared and test data set and on generated conversations.

The Jinja template and the port are built from the same pieces, and every piece of markup in them comes
from `chat/markup.py`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from string import Template
from typing import Any

from minimind_scale.chat import markup
from minimind_scale.chat.markup import (
    ASSISTANT_HEADER,
    EMPTY_THINK,
    THINK_CLOSE,
    THINK_OPEN,
    THINK_PROMPT_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_RESPONSE_CLOSE,
    TOOL_RESPONSE_OPEN,
    TURN_END,
    TURN_START,
)
from minimind_scale.chat.messages import ROLES

SYSTEM_HEADER = TURN_START + "system\n"
TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
               + TOOL_CALL_OPEN + TOOL_CALL_CLOSE + " XML tags:\n" + TOOL_CALL_OPEN
               + "\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n" + TOOL_CALL_CLOSE + TURN_END
               + "\n")

# The Jinja source, with `${NAME}` where a piece of markup (or a piece above) goes. Inside the Jinja string
# literals a newline is written as the two characters backslash-n, as MiniMind's template writes it.
_JINJA_SOURCE = (
    "{%- set opens_with_system = messages[0].role == 'system' %}"
    "{%- if tools %}"
    "{{- '${SYSTEM_HEADER}' }}"
    "{%- if opens_with_system %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '${TOOLS_INTRO}' }}"
    "{%- for tool in tools %}{{- '\\n' ~ (tool | tojson) }}{%- endfor %}"
    "{{- '${TOOLS_OUTRO}' }}"
    "{%- elif opens_with_system %}"
    "{{- '${SYSTEM_HEADER}' + messages[0].content + '${TURN_END}\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- set content = message.content if message.content is string else '' %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '${TURN_START}' ~ message.role ~ '\\n' ~ content ~ '${TURN_END}\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- if message.reasoning_content is string %}"
    "{%- set thought = message.reasoning_content %}"
    "{%- elif '${THINK_CLOSE}' in content %}"
    "{%- set pieces = content.split('${THINK_CLOSE}') %}"
    "{%- set thought = pieces[0].rstrip('\\n').split('${THINK_OPEN}')[-1].lstrip('\\n') %}"
    "{%- set content = pieces[-1].lstrip('\\n') %}"
    "{%- else %}"
    "{%- set thought = '' %}"
    "{%- endif %}"
    "{{- '${ASSISTANT_HEADER}${THINK_PROMPT_OPEN}' ~ thought.strip('\\n') ~ '\\n${THINK_CLOSE}\\n\\n'"
    " ~ content.lstrip('\\n') }}"
    "{%- for call in (message.tool_calls or []) %}"
    "{%- if content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{%- set fn = call.function if call.function else call %}"
    "{%- set args = fn.arguments if fn.arguments is string else (fn.arguments | tojson) %}"
    "{{- '${TOOL_CALL_OPEN}\\n{\"name\": \"' ~ fn.name ~ '\", \"arguments\": ' ~ args ~ '}\\n${TOOL_CALL_CLOSE}' }}"
    "{%- endfor %}"
    "{{- '${TURN_END}\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or loop.previtem.role != 'tool' %}{{- '${TURN_START}user' }}{%- endif %}"
    "{{- '\\n${TOOL_RESPONSE_OPEN}\\n' ~ content ~ '\\n${TOOL_RESPONSE_CLOSE}' }}"
    "{%- if loop.last or loop.nextitem.role != 'tool' %}{{- '${TURN_END}\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '${ASSISTANT_HEADER}${THINK_PROMPT_OPEN}' }}"
    "{%- if not (open_thinking is defined and open_thinking is true) %}{{- '\\n${THINK_CLOSE}\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def _jinja_string_body(text: str) -> str:
    """`text` as it is written between the quotes of a single-quoted Jinja string literal."""
    return text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


# Every string constant of chat/markup.py, by its name there, and the template's own pieces.
_PIECES = {name: value for name, value in vars(markup).items() if name.isupper() and isinstance(value, str)}
_PIECES.update(SYSTEM_HEADER=SYSTEM_HEADER, TOOLS_INTRO=TOOLS_INTRO, TOOLS_OUTRO=TOOLS_OUTRO)
CHAT_TEMPLATE = Template(_JINJA_SOURCE).substitute({name: _jinja_string_body(v) for name, v in _PIECES.items()})


# ---------------------------------------------------------------------------------------------- the port

def _tojson(value: Any) -> str:
    # transformers' `tojson` filter (chat_template_utils): json.dumps without ASCII or HTML escaping.
    return json.dumps(value, ensure_ascii=False)


def _assistant_turn(message: dict) -> str:
    """One assistant turn as the template writes it: think block, answer, tool calls, end of turn."""
    content = message["content"]
    thought = message.get("reasoning_content")
    if not isinstance(thought, str):
        thought = ""
        if THINK_CLOSE in content:
            pieces = content.split(THINK_CLOSE)
            thought = pieces[0].rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n")
            content = pieces[-1].lstrip("\n")
    out = [ASSISTANT_HEADER + THINK_PROMPT_OPEN + thought.strip("\n") + "\n" + THINK_CLOSE + "\n\n"
           + content.lstrip("\n")]
    for k, call in enumerate(message.get("tool_calls") or ()):
        if content or k:
            out.append("\n")
        fn = call["function"] if call.get("function") else call
        args = fn["arguments"]
        out.append(TOOL_CALL_OPEN + '\n{"name": "' + fn["name"] + '", "arguments": '
                   + (args if isinstance(args, str) else _tojson(args)) + "}\n" + TOOL_CALL_CLOSE)
    out.append(TURN_END + "\n")
    return "".join(out)


def _render_minimind(messages: list[dict], tools: list | None, add_generation_prompt: bool = False,
                     open_thinking: Any = None) -> str:
    """MiniMind's chat template (both the shared tokenizer's and the packaged one render alike), in Python.
    Only for inputs `_portable` accepts; equal to the template on them (tests/test_batched_encode.py)."""
    out = []
    first = messages[0]
    if tools:
        out.append(SYSTEM_HEADER)
        if first["role"] == "system":
            out.append(first["content"] + "\n\n")
        out.append(TOOLS_INTRO)
        for tool in tools:
            out.append("\n" + _tojson(tool))
        out.append(TOOLS_OUTRO)
    elif first["role"] == "system":
        out.append(SYSTEM_HEADER + first["content"] + TURN_END + "\n")
    last = len(messages) - 1
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "user" or (role == "system" and i):
            out.append(TURN_START + role + "\n" + content + TURN_END + "\n")
        elif role == "assistant":
            out.append(_assistant_turn(message))
        elif role == "tool":
            # A run of tool messages is one user turn holding one response block per message.
            if i == 0 or messages[i - 1]["role"] != "tool":
                out.append(TURN_START + "user")
            out.append("\n" + TOOL_RESPONSE_OPEN + "\n" + content + "\n" + TOOL_RESPONSE_CLOSE)
            if i == last or messages[i + 1]["role"] != "tool":
                out.append(TURN_END + "\n")
    if add_generation_prompt:
        out.append(ASSISTANT_HEADER + (THINK_PROMPT_OPEN if open_thinking is True else EMPTY_THINK))
    return "".join(out)


# sha256 of a chat template's exact text -> its Python port. The hashes are of the texts the tokenizers
# hold, so a change to `CHAT_TEMPLATE` cannot silently move the port onto a template it no longer matches.
PORTED_TEMPLATES: dict[str, Callable[..., str]] = {
    # ../shared/tokenizers/minimind (MiniMind's tokenizer_config.json)
    "97c6a9ef3f8d35044f435bb7773f1af160a7328ab6e8d2e9d67702941320a711": _render_minimind,
    # minimind_scale/assets/tokenizer (the packaged default; its text is CHAT_TEMPLATE)
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
