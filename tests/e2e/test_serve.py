"""`serve` driven as a user would: the real CLI in a subprocess, spoken to with the official `openai` client.

The model is the session's tool-memorised tiny model: asked the task's question with the task's tools, it
calls calculate_math; asked anything else, it writes deterministic (greedy) nonsense, which is all the
comparisons below need.
"""
from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving import is_openai_error, post_json, running_server

from conftest import cli_in_process

openai = pytest.importorskip("openai", reason="the serve tests need the openai client (pip install -e '.[dev]')")
pytest.importorskip("fastapi", reason="serve needs its packages (pip install -e '.[serve]')")

from minimind_scale.agent.records import read_agent_tasks  # noqa: E402

PROMPTS = ["What is 37 * 43?", "hello", "Who are you?", "Tell me a story about a cat."]
ANSWER_TOKENS = 24


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("serve") / "serve.log"


@pytest.fixture(scope="module")
def server(tool_memorised_model, data_cache, server_log):
    model_dir, tasks_file, _ = tool_memorised_model
    with running_server(model_dir, server_log, data_cache) as url:
        yield url, read_agent_tasks(tasks_file)[0]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, messages, stream=False, **kwargs):
    """(content, reasoning_content, finish_reason, usage) of one greedy answer, joined from the chunks when
    streamed."""
    kwargs = {"temperature": 0, "max_tokens": ANSWER_TOKENS, **kwargs}
    if not stream:
        r = client.chat.completions.create(model="m", messages=messages, **kwargs)
        m = r.choices[0].message
        return m.content, getattr(m, "reasoning_content", None), r.choices[0].finish_reason, r.usage.model_dump()
    content, reasoning, finish, usage = "", "", None, None
    for chunk in client.chat.completions.create(model="m", messages=messages, stream=True, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            finish = choice.finish_reason or finish
    return content, reasoning or None, finish, usage


def user(text):
    return [{"role": "user", "content": text}]


def test_models_and_health(server, client):
    url, _ = server
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"
    ids = [m.id for m in client.models.list().data]
    assert len(ids) == 1 and ids[0].endswith("final")
    assert client.models.retrieve(ids[0]).id == ids[0]


@pytest.mark.parametrize("think", [False, True])
def test_streamed_and_non_streamed_greedy_answers_are_equal(client, think):
    extra = {"extra_body": {"chat_template_kwargs": {"open_thinking": True}}} if think else {}
    for prompt in PROMPTS[:2]:
        whole = ask(client, user(prompt), **extra)
        streamed = ask(client, user(prompt), stream=True, **extra)
        assert streamed == whole
        content, reasoning, finish, usage = whole
        assert finish in ("stop", "length")
        assert usage["completion_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage[
            "completion_tokens"]
        assert "<think>" not in (content or "") and "</think>" not in (content or "")
        if think:  # the prompt opened a think block, so the reply starts with reasoning
            assert reasoning
    # The thinking switch reaches the template: the same question gives a different reply.
    assert ask(client, user(PROMPTS[0])) != ask(client, user(PROMPTS[0]), **{
        "extra_body": {"chat_template_kwargs": {"open_thinking": True}}})


def test_four_concurrent_requests_each_get_their_own_answer(client):
    alone = [ask(client, user(p))[0] for p in PROMPTS]
    assert len(set(alone)) > 1, "the prompts must have different answers for this test to mean anything"
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        # Half of them streamed: both kinds share the one worker.
        together = list(pool.map(lambda i: ask(client, user(PROMPTS[i]), stream=i % 2 == 1)[0], range(len(PROMPTS))))
    assert together == alone


def test_seed_makes_a_sampled_answer_reproducible(client):
    sampled = [ask(client, user("hello"), temperature=1.0, seed=seed)[0] for seed in (7, 7, 8, -9)]
    assert sampled[0] == sampled[1]
    assert len(set(sampled[1:])) > 1, "different seeds should sample different answers"


def test_the_model_calls_its_tool_streamed_and_not(server, client):
    _, task = server
    r = client.chat.completions.create(model="m", messages=task.messages, tools=task.tools, temperature=0,
                                       max_tokens=96)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content  # the call was all the model said; no tag is left in the content
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == "calculate_math"
    assert json.loads(call.function.arguments) == {"expression": "37 * 43"}

    deltas, finish, texts = [], None, []
    for chunk in client.chat.completions.create(model="m", messages=task.messages, tools=task.tools,
                                                temperature=0, max_tokens=96, stream=True):
        for c in chunk.choices:
            deltas += c.delta.tool_calls or []
            texts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert "<tool_call>" not in "".join(texts) and "</tool_call>" not in "".join(texts)
    [delta] = deltas
    assert delta.index == 0 and delta.id and delta.type == "function"
    assert delta.function.name == "calculate_math"
    assert json.loads(delta.function.arguments) == {"expression": "37 * 43"}


def test_without_tools_the_call_stays_text_without_tags(server, client):
    _, task = server
    r = client.chat.completions.create(model="m", messages=task.messages, temperature=0, max_tokens=96)
    assert not r.choices[0].message.tool_calls
    assert "<tool_call>" not in (r.choices[0].message.content or "")


BAD_REQUESTS = {
    "no messages": {"model": "m"},
    "empty messages": {"messages": []},
    "messages not a list": {"messages": "hello"},
    "unknown role": {"messages": [{"role": "wizard", "content": "hi"}]},
    "content of the wrong type": {"messages": [{"role": "user", "content": 5}]},
    "temperature of the wrong type": {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
    "max_tokens 0": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
    "max_tokens negative": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3},
    "stream not a bool": {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
    "prompt longer than the context": {"messages": [{"role": "user", "content": "word " * 40000}], "max_tokens": 4},
    "answer beyond the context": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6},
    "two answers": {"messages": [{"role": "user", "content": "hi"}], "n": 2},
    "a system turn after the first": {"messages": [{"role": "user", "content": "hi"},
                                                   {"role": "system", "content": "late"}]},
    "tools of the wrong shape": {"messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "f"}]},
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_a_malformed_request_gets_400_in_openai_error_shape(server, name):
    url, _ = server
    status, body = post_json(url + "/v1/chat/completions", BAD_REQUESTS[name])
    assert status == 400, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]


def test_broken_json_and_unknown_routes_get_openai_errors_and_the_server_lives_on(server, client):
    url, _ = server
    assert post_json(url + "/v1/chat/completions", b"{not json")[0] == 400
    status, body = post_json(url + "/v1/nothing", {})
    assert status == 404 and body["error"]["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=0)
    assert caught.value.status_code == 400 and caught.value.param == "max_tokens"
    assert ask(client, user("hello"))[0] == ask(client, user("hello"))[0]  # still answering


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_goes_away_does_not_keep_the_model_busy(server, stream):
    patient = openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=10)
    story = user("Tell me a story about a cat.")
    assert ask(patient, story, max_tokens=500)[2] == "length", "this test needs an answer that goes on and on"
    impatient = openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=1.5)
    long_answer = {"model": "m", "messages": story, "temperature": 0, "max_tokens": 30000}  # a minute or more
    if stream:
        answer = impatient.chat.completions.create(stream=True, **long_answer)
        next(iter(answer))
        answer.close()  # hangs up after the first chunk
    else:
        with pytest.raises(openai.APITimeoutError):  # gives up waiting after 1.5 s
            impatient.chat.completions.create(**long_answer)
    # The abandoned generation stops, so the next client is answered at once instead of after it.
    assert ask(patient, user("hello"))[2] in ("stop", "length")


def test_a_missing_model_or_a_taken_port_exits_2_with_one_message(server, tool_memorised_model, tmp_path, capsys):
    code, err = cli_in_process(["serve", "--model", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "model directory not found" in err
    port = server[0].rsplit(":", 1)[1]  # held by the running server
    code, err = cli_in_process(["serve", "--model", str(tool_memorised_model[0]), "--port", port], capsys)
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err, err


HOSTILE_REQUESTS = {  # each once answered 500
    "a lone surrogate in the text": (b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
                                     "messages[0].content"),
    "a lone surrogate in a tool description": (
        b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": '
        b'{"name": "f", "description": "\\udfff"}}]}', "tools[0].function.description"),
    "JSON nested 1000 deep in an ignored field": (
        b'{"messages": [{"role": "user", "content": "hi"}], "metadata": ' + b"[" * 1000 + b"]" * 1000 + b"}", None),
    "a render argument as a template variable": (
        b'{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"tokenize": true}}',
        "chat_template_kwargs.tokenize"),
}


@pytest.mark.parametrize("name", HOSTILE_REQUESTS)
def test_hostile_but_valid_json_gets_400_naming_the_field(server, name):
    body, param = HOSTILE_REQUESTS[name]
    status, answer = post_json(server[0] + "/v1/chat/completions", body)
    assert status == 400 and is_openai_error(answer), answer
    assert answer["error"]["param"] == param
    assert "Error" not in answer["error"]["message"], "a Python exception's name is no message for a client"


@pytest.mark.parametrize("stream", [False, True])
def test_a_tiny_temperature_is_greedy(client, stream):
    greedy = ask(client, user("hello"))
    assert ask(client, user("hello"), stream=stream, temperature=1e-45) == greedy


def test_a_non_json_content_type_gets_415(server):
    request = urllib.request.Request(server[0] + "/v1/chat/completions", method="POST",
                                     data=json.dumps({"messages": user("hi")}).encode(),
                                     headers={"Content-Type": "text/plain"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 415 and is_openai_error(json.loads(caught.value.read()))


def test_the_openapi_document_describes_the_chat_request(server):
    with urllib.request.urlopen(server[0] + "/openapi.json", timeout=10) as r:
        document = json.loads(r.read())
    operation = document["paths"]["/v1/chat/completions"]["post"]
    ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert {"messages", "temperature", "tools", "stream"} <= request["properties"].keys()
    assert "greedy" in request["properties"]["temperature"]["description"]
    assert {"200", "400", "415"} <= operation["responses"].keys()


def test_a_client_that_hangs_up_mid_body_is_one_log_line(server, server_log):
    host, port = server[0].removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"messages\": [")
        time.sleep(0.5)
    deadline = time.monotonic() + 10
    while "before sending the whole request body" not in server_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = [line for line in server_log.read_text().splitlines() if "whole request body" in line]
    assert len(lines) == 1, server_log.read_text()
    assert "Traceback" not in server_log.read_text()
