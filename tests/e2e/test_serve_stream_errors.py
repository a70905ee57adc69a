"""A generation that fails mid-answer, on a real `serve`: the error reaches the client in OpenAI's shape.

The server runs tests/plugins/failing_backend.py's backend, the hf backend made to raise after streaming a few
tokens. Streamed, the client gets HTTP 200 (the headers went out before the failure), the content so far, one
event holding the error body, then the end of the stream; not streamed, a 500 with the same body. Either way the
server goes on answering.
"""
from __future__ import annotations

import json
import urllib.request

import pytest
from serving import is_openai_error, post_json, running_server

from conftest import REPO

pytest.importorskip("fastapi", reason="serve needs its packages (pip install -e '.[serve]')")

FAILING_PLUGIN = REPO / "tests" / "plugins" / "failing_backend.py"
BACKEND = "failing_hf"  # what the plugin registers
INJECTED = "injected failure"  # what its backend raises
REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 24}


@pytest.fixture(scope="module")
def server(tool_memorised_model, data_cache, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_stream_errors") / "serve.log"
    with running_server(tool_memorised_model[0], log, data_cache, "--plugin", str(FAILING_PLUGIN),
                        "--generation_backend", BACKEND) as url:
        yield url


def streamed_events(url: str) -> tuple[int, list[str]]:
    """(HTTP status, the data field of every server-sent event until the server closes the stream) of a
    streamed chat completion."""
    body = json.dumps({**REQUEST, "stream": True}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        status, text = response.status, response.read().decode()
    events = [block for block in text.split("\n\n") if block.strip()]
    assert all(e.startswith("data: ") for e in events), text
    return status, [e.removeprefix("data: ") for e in events]


def assert_injected_error(body: dict) -> None:
    """`body` is a non-streamed error body carrying the backend's failure as a server error."""
    assert is_openai_error(body), body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == "server_error"
    assert INJECTED in body["error"]["message"] and "RuntimeError" in body["error"]["message"]


def test_a_streamed_failure_sends_the_content_so_far_then_one_error_event_then_done(server):
    status, events = streamed_events(server)
    assert status == 200
    *chunks, error, done = events
    assert done == "[DONE]"  # the stream still ends the way a finished one does, then the server closes it
    assert_injected_error(json.loads(error))
    chunks = [json.loads(c) for c in chunks]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content, "the tokens streamed before the failure must reach the client"
    # A failed answer never claims to have finished: no chunk carries a finish_reason.
    assert all(c["choices"][0].get("finish_reason") is None for c in chunks)


def test_a_non_streamed_failure_is_a_500_with_the_same_error_body(server):
    status, body = post_json(server + "/v1/chat/completions", REQUEST, timeout=120)
    assert status == 500
    assert_injected_error(body)
    _, events = streamed_events(server)
    assert json.loads(events[-2]) == body, "streamed and non-streamed failures must say the same"


def test_the_server_keeps_answering_after_failed_generations(server):
    streamed_events(server)
    post_json(server + "/v1/chat/completions", REQUEST, timeout=120)
    with urllib.request.urlopen(server + "/v1/models", timeout=30) as r:
        assert r.status == 200 and json.loads(r.read())["data"]
    # The generation thread survived too: the next request is generated (and fails the same way) again.
    status, body = post_json(server + "/v1/chat/completions", REQUEST, timeout=120)
    assert status == 500 and INJECTED in body["error"]["message"]
