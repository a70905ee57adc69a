"""A model's reply, split as it streams into reasoning, answer text and tool calls.

MiniMind-style models write their reasoning in `<think>…</think>` and call tools with
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. `ReplyParser` turns the reply's text,
fed in pieces of any size, into `Piece`s: reasoning text, content text and parsed tool calls, so
that no tag ever reaches the content. Text that could still be the start of a tag is held back until
the next piece decides it, and the result does not depend on where the pieces were cut: the
non-streamed answer is the same parser fed once.

Whitespace at either end of the reasoning and of the content is dropped (the template puts newlines
around both), so a streamed answer equals the stripped whole. A `<tool_call>` block that does not
parse (or any block when the request declared no tools) becomes content: its text without the tags,
so nothing the model wrote is lost and no tag leaks.

`answer_text` is the cruder cut that rewards and agent rollouts use on a finished reply: everything after
its last closing think tag, so that no reasoning, however the model wrote it, can pass for the answer.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Literal

from minimind_scale.chat.markup import THINK_CLOSE, THINK_OPEN, TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from minimind_scale.chat.tool_calls import parse_tool_calls

CONTENT_TAGS = (THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI's API carries it


@dataclass(frozen=True)
class Piece:
    kind: Literal["reasoning", "content", "tool_call"]
    text: str = ""
    call: ToolCall | None = None


class _Trimmed:
    """One text stream with its leading and trailing whitespace removed, whatever the chunking: trailing
    whitespace is held until more text follows it, and dropped at the end."""

    def __init__(self):
        self.started, self.held = False, ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = text.rstrip()
        if not body:
            self.held += text
            return ""
        out, self.held = self.held + body, text[len(body):]
        return out


def _held_tail(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the start of one of `tags` (it may become that tag)."""
    for n in range(min(len(text), max(len(t) for t in tags) - 1), 0, -1):
        if any(t.startswith(text[-n:]) for t in tags):
            return n
    return 0


def _first_tag(text: str, tags: tuple[str, ...]) -> tuple[int, str]:
    found = [(i, t) for t in tags if (i := text.find(t)) >= 0]
    return min(found) if found else (-1, "")


class ReplyParser:
    """Feed the reply's text with `feed`, then call `finish`; each returns the pieces it completed.

    `in_reasoning`: the prompt opened a think block, so the reply starts inside one. `parse_tools`:
    the request declared tools, so well-formed `<tool_call>` blocks become tool calls.
    """

    def __init__(self, in_reasoning: bool = False, parse_tools: bool = True):
        self.mode: Literal["reasoning", "content", "call"] = "reasoning" if in_reasoning else "content"
        self.parse_tools = parse_tools
        self.pending = ""
        self.call_text = ""
        self.out = {"reasoning": _Trimmed(), "content": _Trimmed()}

    def feed(self, text: str) -> list[Piece]:
        self.pending += text
        pieces: list[Piece] = []
        while self._step(pieces):
            pass
        return pieces

    def finish(self) -> list[Piece]:
        """The pieces still held: a tag that never completed is text, a block that never closed is content."""
        pieces: list[Piece] = []
        if self.mode == "call":
            self._text(pieces, "content", self.call_text + self.pending, strip_tags=True)
        elif self.pending:
            self._text(pieces, self.mode, self.pending)
        self.pending, self.call_text = "", ""
        return pieces

    def _step(self, pieces: list[Piece]) -> bool:
        """Consume what `pending` decides; True while a tag was consumed (more may follow)."""
        if self.mode == "call":
            end = self.pending.find(TOOL_CALL_CLOSE)
            if end < 0:
                keep = _held_tail(self.pending, (TOOL_CALL_CLOSE,))
                self.call_text += self.pending[:len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep:]
                return False
            self._call(pieces, self.call_text + self.pending[:end])
            self.call_text, self.pending, self.mode = "", self.pending[end + len(TOOL_CALL_CLOSE):], "content"
            return True
        tags = (THINK_CLOSE,) if self.mode == "reasoning" else CONTENT_TAGS
        at, tag = _first_tag(self.pending, tags)
        if at < 0:
            keep = _held_tail(self.pending, tags)
            self._text(pieces, self.mode, self.pending[:len(self.pending) - keep])
            self.pending = self.pending[len(self.pending) - keep:]
            return False
        self._text(pieces, self.mode, self.pending[:at])
        self.pending = self.pending[at + len(tag):]
        # A stray closing tag in the content is dropped; an opening one switches mode.
        self.mode = {THINK_CLOSE: "content", THINK_OPEN: "reasoning", TOOL_CALL_OPEN: "call"}.get(tag, "content")
        return True

    def _text(self, pieces: list[Piece], kind: str, text: str, strip_tags: bool = False) -> None:
        if strip_tags:
            for tag in CONTENT_TAGS:
                text = text.replace(tag, "")
        text = self.out[kind].push(text)
        if text:
            pieces.append(Piece(kind, text))

    def _call(self, pieces: list[Piece], block: str) -> None:
        parsed = parse_tool_calls(TOOL_CALL_OPEN + block + TOOL_CALL_CLOSE)
        call = parsed[0] if parsed else None
        if not self.parse_tools or call is None or call.error is not None:
            self._text(pieces, "content", block, strip_tags=True)
            return
        arguments = json.dumps(call.arguments, ensure_ascii=False)
        pieces.append(Piece("tool_call", call=ToolCall(f"call_{uuid.uuid4().hex[:24]}", call.name, arguments)))



def answer_text(text: str) -> str:
    """What follows the last closing think tag of a finished reply (the whole text without one)."""
    return text.rsplit(THINK_CLOSE, 1)[-1] if THINK_CLOSE in text else text
