"""`serve` fuzzed from its own published OpenAPI document: schemathesis generates requests that fit the schema
and requests that break it, for every route, against the real server on loopback. Whatever it sends, the answer
is never a 500 (a 503 is the documented answer of a full queue), and every refusal has OpenAI's error shape."""
from __future__ import annotations

import json

import pytest
from serving import is_openai_error, running_server

schemathesis = pytest.importorskip("schemathesis", reason="the fuzz test needs schemathesis (pip install -e '.[dev]')")
pytest.importorskip("fastapi", reason="serve needs its packages (pip install -e '.[serve]')")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

EXAMPLES_PER_ROUTE = 50


@pytest.fixture(scope="module")
def served_schema(tool_memorised_model, data_cache, tmp_path_factory):
    # Short default answers keep the examples that do generate fast.
    log = tmp_path_factory.mktemp("serve_fuzz") / "serve.log"
    with running_server(tool_memorised_model[0], log, data_cache, "--max_tokens", "4") as url:
        yield schemathesis.openapi.from_url(url + "/openapi.json")


@pytest.mark.timeout(300)
def test_no_request_gets_a_500_and_every_refusal_is_an_openai_error(served_schema):
    operations = [result.ok() for result in served_schema.get_all_operations()]
    assert any(op.path == "/v1/chat/completions" for op in operations), "the chat route must be in the document"
    for operation in operations:
        answers_well(operation)


def answers_well(operation) -> None:
    """Up to EXAMPLES_PER_ROUTE generated requests to one route, each answered without a 500."""
    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        response = case.call(timeout=60)
        assert response.status_code != 500 and response.status_code < 600, (case.body, response.text)
        if response.status_code >= 400:
            assert is_openai_error(json.loads(response.text)), (case.body, response.text)

    check()
