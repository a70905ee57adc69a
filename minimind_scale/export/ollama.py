"""The Ollama Modelfile written beside a GGUF file: FROM, the chat TEMPLATE, stop tokens and sampling defaults.

Ollama renders prompts with its own Go template, not the Jinja template inside the GGUF file, so TEMPLATE below
spells out MiniMind's ChatML layout: system (and tool declarations), user turns, assistant turns with their
<think> block and <tool_call>s, tool results as <tool_response>s inside one user turn, and the generation
prompt with an empty <think> block (thinking off, the tokenizer's default). `chatml_prompt` is the same layout in
Python: export checks that the tokenizer's own template renders a probe conversation exactly so, and warns when
it does not (a tokenizer with another template needs its TEMPLATE edited by hand).
"""
from __future__ import annotations

import json

from minimind_scale.chat.markup import (
    ASSISTANT_HEADER,
    EMPTY_THINK,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_RESPONSE_CLOSE,
    TOOL_RESPONSE_OPEN,
    TURN_END,
    TURN_START,
)
from minimind_scale.chat.template import SYSTEM_HEADER, TOOLS_INTRO, TOOLS_OUTRO

MODELFILE = "Modelfile"
GENERATION_PROMPT = ASSISTANT_HEADER + EMPTY_THINK
END_OF_TURN = TURN_END + "\n"
TOOL_RESULT_OPEN, TOOL_RESULT_CLOSE = "\n" + TOOL_RESPONSE_OPEN + "\n", "\n" + TOOL_RESPONSE_CLOSE
THOUGHT_OPEN, THOUGHT_CLOSE = ASSISTANT_HEADER + THINK_OPEN + "\n", "\n" + THINK_CLOSE + "\n\n"
CALL_OPEN, CALL_CLOSE = TOOL_CALL_OPEN + '\n{"name": "', "}\n" + TOOL_CALL_CLOSE

# Go text/template, as Ollama runs it: .Tools, and .Messages (.Role, .Content, .Thinking, .ToolCalls) with the
# system turn as their first message. No `{{-` trimming: the literal text is exactly the layout, newlines
# included. $prev and $next are the neighbouring roles: consecutive tool results share one user turn.
TEMPLATE = (
    '{{ $first := "" }}{{ if .Messages }}{{ $first = (index .Messages 0).Role }}{{ end }}'
    '{{ if .Tools }}' + SYSTEM_HEADER + '{{ if eq $first "system" }}{{ (index .Messages 0).Content }}\n\n{{ end }}'
    + TOOLS_INTRO + '{{ range .Tools }}\n{{ . }}{{ end }}' + TOOLS_OUTRO
    + '{{ else if eq $first "system" }}' + SYSTEM_HEADER + '{{ (index .Messages 0).Content }}' + END_OF_TURN
    + '{{ end }}{{ $prev := "" }}{{ range $i, $m := .Messages }}{{ $rest := slice $.Messages $i }}'
    '{{ $last := eq (len $rest) 1 }}{{ $next := "" }}{{ if not $last }}{{ $next = (index $rest 1).Role }}{{ end }}'
    '{{ if or (eq $m.Role "user") (and (eq $m.Role "system") $i) }}'
    + TURN_START + '{{ $m.Role }}\n{{ $m.Content }}' + END_OF_TURN
    + '{{ else if eq $m.Role "assistant" }}' + THOUGHT_OPEN + '{{ $m.Thinking }}' + THOUGHT_CLOSE
    + '{{ $m.Content }}{{ range $j, $c := $m.ToolCalls }}{{ if or $m.Content $j }}\n{{ end }}'
    + CALL_OPEN + '{{ $c.Function.Name }}", "arguments": {{ $c.Function.Arguments }}' + CALL_CLOSE
    + '{{ end }}' + END_OF_TURN
    + '{{ else if eq $m.Role "tool" }}{{ if ne $prev "tool" }}' + TURN_START + 'user{{ end }}'
    + TOOL_RESULT_OPEN + '{{ $m.Content }}' + TOOL_RESULT_CLOSE + '{{ if ne $next "tool" }}' + END_OF_TURN
    + '{{ end }}{{ end }}{{ $prev = $m.Role }}{{ end }}'
    '{{ if ne $prev "assistant" }}' + GENERATION_PROMPT + '{{ end }}'
)


def chatml_prompt(messages: list[dict], tools: list[dict] | None = None) -> str:
    """What TEMPLATE renders for a conversation that ends on a user or tool turn (Ollama then generates):
    the same branches in Python, for checking against a tokenizer's own template."""
    first = messages[0]["role"] if messages else ""
    out = ""
    if tools:
        system = messages[0]["content"] + "\n\n" if first == "system" else ""
        declared = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
        out += SYSTEM_HEADER + system + TOOLS_INTRO + declared + TOOLS_OUTRO
    elif first == "system":
        out += SYSTEM_HEADER + messages[0]["content"] + END_OF_TURN
    roles = [m["role"] for m in messages]
    for i, m in enumerate(messages):
        prev, next_ = (roles[i - 1] if i else ""), (roles[i + 1] if i + 1 < len(roles) else "")
        if m["role"] == "user" or (m["role"] == "system" and i):
            out += TURN_START + m["role"] + "\n" + m["content"] + END_OF_TURN
        elif m["role"] == "assistant":
            calls = "".join(("\n" if (m["content"] or j) else "") + CALL_OPEN + c["name"] + '", "arguments": '
                            + json.dumps(c["arguments"], ensure_ascii=False) + CALL_CLOSE
                            for j, c in enumerate(m.get("tool_calls") or []))
            out += THOUGHT_OPEN + m.get("thinking", "") + THOUGHT_CLOSE + m["content"] + calls + END_OF_TURN
        elif m["role"] == "tool":
            out += (TURN_START + "user" if prev != "tool" else "") + TOOL_RESULT_OPEN + m["content"] \
                + TOOL_RESULT_CLOSE + (END_OF_TURN if next_ != "tool" else "")
    return out + (GENERATION_PROMPT if roles[-1:] != ["assistant"] else "")


PROBE = [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "What is 37 * 43?"},
         {"role": "assistant", "content": "", "tool_calls": [{"name": "calculate", "arguments": {"x": "37 * 43"}}]},
         {"role": "tool", "content": "1591"},
         {"role": "assistant", "content": "37 * 43 = 1591."},
         {"role": "user", "content": "Thanks!"}]


def template_matches(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders the probe conversation as TEMPLATE does."""
    hf_messages = [dict(m, tool_calls=[{"type": "function", "function": c} for c in m["tool_calls"]])
                   if m.get("tool_calls") else m for m in PROBE]
    try:
        rendered = tokenizer.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that cannot render tool calls at all is no match
        return False
    return rendered == chatml_prompt(PROBE)


def stop_tokens(tokenizer) -> list[str]:
    """The tokens that end a reply: end of turn (eos) and end of text, where the tokenizer has them."""
    stops = [tokenizer.eos_token, TURN_END, "<|endoftext|>"]
    vocab = tokenizer.get_vocab()
    return [t for i, t in enumerate(stops) if t and t in vocab and t not in stops[:i]]


def modelfile_text(gguf_name: str, tokenizer, generation_config) -> str:
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{TEMPLATE}"""']
    lines += [f'PARAMETER stop "{stop}"' for stop in stop_tokens(tokenizer)]
    for key in ("temperature", "top_p", "top_k"):
        value = getattr(generation_config, key, None) if generation_config is not None else None
        if value is not None and getattr(generation_config, "do_sample", True):
            lines.append(f"PARAMETER {key} {value}")
    if not template_matches(tokenizer):
        print("warning: the tokenizer's chat template is not MiniMind's ChatML layout; the Modelfile's TEMPLATE "
              "follows that layout: edit it to match before `ollama create`", flush=True)
    return "\n".join(lines) + "\n"
