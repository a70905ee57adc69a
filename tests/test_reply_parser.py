"""reply_parser: a reply split into reasoning, content and tool calls, the same however it is cut into pieces."""
from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from minimind_scale.chat.reply_parser import CONTENT_TAGS, ReplyParser, answer_text

CALL = '<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "37 * 43"}}\n</tool_call>'


def summary(pieces):
    """(reasoning, content, [(name, arguments)]): what a client sees, without the random call ids."""
    reasoning = "".join(p.text for p in pieces if p.kind == "reasoning")
    content = "".join(p.text for p in pieces if p.kind == "content")
    return reasoning, content, [(p.call.name, json.loads(p.call.arguments)) for p in pieces if p.call]


def fed_once(text: str, **kwargs):
    """Every piece of a whole reply: the parser fed the text in one piece, then finished."""
    parser = ReplyParser(**kwargs)
    return parser.feed(text) + parser.finish()


def fed_in(text: str, cuts: list[int], **kwargs):
    parser, pieces, start = ReplyParser(**kwargs), [], 0
    for cut in sorted(set(cuts)) + [len(text)]:
        pieces += parser.feed(text[start:cut])
        start = cut
    return pieces + parser.finish()


def test_reasoning_content_and_a_call_are_told_apart():
    text = f"<think>\nLet me use the tool.\n</think>\n\nI will compute it.\n{CALL}"
    assert summary(fed_once(text)) == ("Let me use the tool.", "I will compute it.",
                                       [("calculate_math", {"expression": "37 * 43"})])


def test_a_reply_inside_an_opened_think_block_starts_with_reasoning():
    assert summary(fed_once("first this\n</think>\n\nAnswer.", in_reasoning=True)) == ("first this", "Answer.", [])


def test_an_empty_think_block_gives_no_reasoning_and_whitespace_is_trimmed():
    assert summary(fed_once("<think>\n\n</think>\n\n  Paris.  \n")) == ("", "Paris.", [])


def test_a_call_in_openai_form_and_arguments_as_json_text_are_read():
    call = '<tool_call>{"function": {"name": "f", "arguments": "{\\"x\\": 1}"}}</tool_call>'
    assert summary(fed_once(call))[2] == [("f", {"x": 1})]


def test_a_malformed_or_unfinished_call_is_content_without_its_tags():
    assert summary(fed_once("<tool_call>{not json}</tool_call>")) == ("", "{not json}", [])
    assert summary(fed_once('ok <tool_call>{"name": "f", "argu')) == ("", 'ok {"name": "f", "argu', [])


def test_without_declared_tools_a_call_is_content_without_its_tags():
    reasoning, content, calls = summary(fed_once(CALL, parse_tools=False))
    assert calls == [] and "calculate_math" in content and "<tool_call>" not in content


def test_stray_tags_never_reach_the_content():
    assert summary(fed_once("</think>A</tool_call>B")) == ("", "AB", [])


def test_a_partial_tag_at_the_end_is_plain_text():
    assert summary(fed_once("x < y and <thi")) == ("", "x < y and <thi", [])


def test_text_is_held_back_only_while_it_may_be_a_tag():
    parser = ReplyParser()
    assert summary(parser.feed("Hello <too")) == ("", "Hello", [])  # " <too" may become <tool_call>
    assert summary(parser.feed("l>x")) == ("", " <tool>x", [])


def test_the_answer_of_a_finished_reply_follows_its_last_closing_think_tag():
    assert answer_text("<think>\nplan\n</think>\n\nParis.") == "\n\nParis."
    assert answer_text("a</think>b</think>c") == "c"
    assert answer_text("no reasoning here") == "no reasoning here"


PIECES = ["<think>", "</think>", "<tool_call>", "</tool_call>", CALL, "\n", " ", "a", "b c", "<", ">", "{", "}",
          '{"name": "g", "arguments": {}}', "\ufffd"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=14), st.lists(st.integers(0, 400), max_size=12), st.booleans())
def test_the_result_does_not_depend_on_where_the_stream_was_cut(parts, cuts, in_reasoning):
    text = "".join(parts)
    whole = summary(fed_once(text, in_reasoning=in_reasoning))
    assert summary(fed_in(text, [c for c in cuts if c <= len(text)], in_reasoning=in_reasoning)) == whole
    assert not any(tag in whole[1] for tag in CONTENT_TAGS)
    assert whole[1] == whole[1].strip() and whole[0] == whole[0].strip()
