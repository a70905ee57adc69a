"""serve's request checking and prompt building, in process: what is refused (400, naming the field), what a
request renders to, and the context check."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="serve needs its packages (pip install -e '.[serve]')")

from minimind_scale.chat.reply_parser import Piece, ToolCall
from minimind_scale.inference.serve_app import ChatService
from minimind_scale.inference.serve_schema import ApiError, completion, parse_request, prompt_parts
from minimind_scale.models.build import load_tokenizer

HI = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def refused(body) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse_request(body)
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize("body, param", [
    ({}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}, "messages[1].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": HI, "top_p": 0}, "top_p"),
    ({"messages": HI, "temperature": 3}, "temperature"),
    ({"messages": HI, "max_tokens": 1.5}, "max_tokens"),
    ({"messages": HI, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": HI, "seed": "1"}, "seed"),
    ({"messages": HI, "stop": ["\n"]}, "stop"),
    ({"messages": HI, "tool_choice": "required"}, "tool_choice"),
    ({"messages": HI, "tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
    ({"messages": HI, "response_format": {"type": "json_object"}}, "response_format"),
])
def test_a_bad_field_is_refused_by_name(body, param):
    assert refused(body).param == param


def test_a_body_that_is_not_an_object_is_refused():
    assert "JSON object" in refused([HI]).message


def test_fields_that_only_describe_the_caller_are_accepted():
    request = parse_request({"messages": HI, "user": "me", "metadata": {"a": "b"}, "presence_penalty": 0})
    assert request.messages[0].content == "hi"


def test_conversation_rules_of_the_project_apply_with_the_field_named():
    for messages, param in [([{"role": "user", "content": ""}], "messages[0].content"),
                            ([{"role": "user", "content": "<|im_start|>x"}], "messages[0].content"),
                            ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
                             "messages[1].role")]:
        with pytest.raises(ApiError) as caught:
            prompt_parts(parse_request({"messages": messages}), None)
        assert caught.value.param == param


def test_messages_become_the_project_conversation_form():
    request = parse_request({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"y\": 2}"},
        {"role": "assistant", "content": ""},  # an empty answer in the history is a real answer
        {"role": "user", "content": "again"}], "tools": TOOLS})
    messages, tools, kwargs = prompt_parts(request, TOOLS)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert messages[1]["content"] == "two parts" and messages[4]["content"] == ""
    assert messages[2]["tool_calls"] == [{"name": "f", "arguments": "{\"x\": 1}"}]
    assert tools == TOOLS and kwargs == {}


@pytest.mark.parametrize("extra, thinks", [
    ({}, False), ({"open_thinking": True}, True), ({"chat_template_kwargs": {"open_thinking": True}}, True),
    ({"chat_template_kwargs": {"enable_thinking": True}}, True), ({"chat_template_kwargs": {"open_thinking": False}},
                                                                  False)])
def test_thinking_is_asked_for_in_either_spelling(extra, thinks):
    _, _, kwargs = prompt_parts(parse_request({"messages": HI, **extra}), None)
    assert kwargs.get("open_thinking", False) is thinks


def test_tool_choice_none_renders_no_tools():
    assert prompt_parts(parse_request({"messages": HI, "tools": TOOLS, "tool_choice": "none"}), TOOLS)[1] is None


def service(tokenizer, context: int, max_tokens: int = 512) -> ChatService:
    return ChatService(worker=None, tokenizer=tokenizer, model_name="m", context=context, max_tokens=max_tokens,
                       temperature=0.7, top_p=0.9)


def test_the_context_holds_prompt_and_answer(tokenizer):
    prompt_tokens = len(service(tokenizer, 10 ** 6).prepare(parse_request({"messages": HI}), None).generation
                        .prompt_ids)
    small = service(tokenizer, prompt_tokens + 10, max_tokens=512)
    assert small.prepare(parse_request({"messages": HI}), None).generation.max_new_tokens == 10
    for body, param in [({"messages": HI, "max_tokens": 11}, "max_tokens"),
                        ({"messages": [{"role": "user", "content": "hi " * 50}]}, "messages")]:
        with pytest.raises(ApiError) as caught:
            small.prepare(parse_request(body), None)
        assert (caught.value.status, caught.value.code, caught.value.param) == (400, "context_length_exceeded", param)


def test_an_opened_think_block_makes_the_reply_start_as_reasoning(tokenizer):
    s = service(tokenizer, 10 ** 6)
    assert s.prepare(parse_request({"messages": HI, "open_thinking": True}), None).in_reasoning
    assert not s.prepare(parse_request({"messages": HI}), None).in_reasoning


def test_a_reply_of_only_a_call_has_null_content_and_finishes_with_tool_calls():
    pieces = [Piece("tool_call", call=ToolCall("call_1", "f", "{}"))]
    body = completion("id", "m", pieces, "stop", 5, 3)
    choice = body["choices"][0]
    assert choice["message"]["content"] is None and choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"] == [{"id": "call_1", "type": "function",
                                                "function": {"name": "f", "arguments": "{}"}}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert completion("id", "m", pieces, "length", 5, 3)["choices"][0]["finish_reason"] == "length"


def test_json_depth_counts_brackets_outside_strings_only():
    from minimind_scale.inference.serve_schema import json_depth

    assert json_depth(b'{"a": [1, {"b": []}], "c": "[[[[{{"}') == 4
    assert json_depth(b'"\\"[[["') == 0
    assert json_depth(b"[" * 65 + b"]" * 65) == 65


def test_a_lone_surrogate_is_refused_naming_its_field():
    tool = {"type": "function", "function": {"name": "f", "description": "bad \ud800"}}
    assert refused({"messages": [*HI, {"role": "assistant", "content": "x\udfff"}]}).param == "messages[1].content"
    assert refused({"messages": HI, "tools": [tool]}).param == "tools[0].function.description"
    assert refused({"messages": HI, "metadata": {"\udc00": 1}}).param == "metadata.\\udc00"


def test_temperatures_below_the_floor_are_greedy():
    from minimind_scale.inference.serve_schema import GREEDY_BELOW, sampling_temperature

    assert [sampling_temperature(t) for t in (0.0, 1e-45, GREEDY_BELOW / 2, GREEDY_BELOW, 0.7)] == [
        0.0, 0.0, 0.0, GREEDY_BELOW, 0.7]
