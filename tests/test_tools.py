"""The tool executor: every way a call can fail is an error observation and the next call still works; a
hanging tool is killed at its timeout; parsing of <tool_call> blocks; loading errors name the file."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import AGENT_DATA, AGENT_TOOLS, REPO
from minimind_scale.agent.tools import load_tools
from minimind_scale.chat.tool_calls import declared_tool_names, parse_tool_calls, required_arguments, tool_schemas
from minimind_scale.errors import UserError

TOOLS = '''
import os
import time
from os.path import join  # imported: not a tool

LIMIT = 3  # not a function: not a tool


def add(a, b):
    return a + b


def sleepy(seconds):
    time.sleep(seconds)
    return "woke up"


def boom(message="bad thing"):
    raise ValueError(message)


def typo():
    return undefined_name  # noqa: F821


def opaque():
    return object()


def nan():
    return float("nan")


def big(n=5000):
    return "x" * n


def big_dict(n=5000):
    return {"data": "y" * n}


def chatty():
    print("printed by a tool")
    return {"ok": True, "text": "héllo 世界"}


def die():
    os._exit(3)


def tell_pid():
    return os.getpid()


def _helper():
    return 1


class NotATool:
    pass
'''


@pytest.fixture(scope="module")
def tools_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tools") / "my_tools.py"
    path.write_text(TOOLS)
    return path


@pytest.fixture()
def box(tools_file):
    with load_tools(tools_file, timeout_sec=0.3, max_result_chars=2048) as toolbox:
        yield toolbox


def error_of(result) -> str:
    assert not result.ok
    assert json.loads(result.content) == {"error": result.error}
    return result.error


def test_public_functions_defined_in_the_file_are_the_tools(box):
    assert box.names == ("add", "big", "big_dict", "boom", "chatty", "die", "nan", "opaque", "sleepy", "tell_pid",
                         "typo")


def test_a_good_call_returns_its_json_and_a_string_as_is(box):
    r = box.call("add", {"a": 2, "b": 3})
    assert (r.ok, r.content, r.error, r.name, r.arguments) == (True, "5", None, "add", {"a": 2, "b": 3})
    assert box.call("add", '{"a": "ab", "b": "cd"}').content == "abcd"  # JSON text arguments, str result as is
    r = box.call("chatty", {})
    assert r.ok and r.content == '{"ok": true, "text": "héllo 世界"}'  # ensure_ascii=False


def test_a_timed_out_tool_is_stopped_and_the_next_call_works(box):
    started = time.monotonic()
    r = box.call("sleepy", {"seconds": 5})
    assert time.monotonic() - started < 1.0
    assert "timed out after 0.3 s" in error_of(r)
    assert box._worker is None  # killed; a fresh worker answers the next call
    started = time.monotonic()
    assert box.call("add", {"a": 1, "b": 1}).content == "2"
    assert time.monotonic() - started < 1.0


def test_unknown_and_undeclared_tools(box):
    assert "unknown tool 'nope'" in error_of(box.call("nope", {}))
    assert "unknown tool" in error_of(box.call("join", {"a": "x"}))  # imported into the file: not a tool
    reason = error_of(box.call("boom", {}, allowed={"add"}))
    assert "'boom' is not declared for this task (declared: add)" in reason
    assert "declared: none" in error_of(box.call("add", {"a": 1, "b": 2}, allowed=set()))
    assert box.call("add", {"a": 1, "b": 2}, allowed={"add"}).ok
    assert "no \"name\"" in error_of(box.call(None, {}))


def test_bad_arguments(box):
    assert "not valid JSON" in error_of(box.call("add", '{"a": 1,'))
    assert "must be a JSON object, got list" in error_of(box.call("add", [1, 2]))
    assert "must be a JSON object, got int" in error_of(box.call("add", "7"))
    assert "wrong arguments for add: missing a required argument: 'b'" in error_of(box.call("add", {"a": 1}))
    assert "unexpected keyword argument 'c'" in error_of(box.call("add", {"a": 1, "b": 2, "c": 3}))


def test_exceptions_and_bad_results_are_observations_and_the_worker_survives(box):
    assert error_of(box.call("boom", {"message": "no fuel"})) == "boom raised ValueError: no fuel"
    # a TypeError inside the tool is the tool's failure, not a wrong argument
    assert "typo raised NameError" in error_of(box.call("typo", {}))
    assert "not JSON-serialisable (object)" in error_of(box.call("opaque", {}))
    assert "not JSON-serialisable (float)" in error_of(box.call("nan", {}))
    assert "crashed the tool worker (the tool worker exited with code 3)" in error_of(box.call("die", {}))
    assert box.call("add", {"a": 1, "b": 2}).content == "3"
    long = "z" * 10_000
    assert len(error_of(box.call("boom", {"message": long}))) < 500  # the observation stays short


def test_results_are_cut_to_max_result_chars(tools_file):
    with load_tools(tools_file, max_result_chars=100) as box:
        assert box.call("big", {}).content == "x" * 100
        r = box.call("big_dict", {})
        assert r.ok and r.content == '{"data": "' + "y" * 90
        assert box.call("big", {"n": 10}).content == "x" * 10


def test_per_call_overhead_is_small(box):
    box.call("add", {"a": 0, "b": 0})
    n = 300
    started = time.perf_counter()
    for i in range(n):
        assert box.call("add", {"a": i, "b": 1}).content == str(i + 1)
    per_call_ms = (time.perf_counter() - started) * 1000 / n
    print(f"tool call overhead: {per_call_ms:.3f} ms per call")
    assert per_call_ms < 5.0


def test_works_from_a_threaded_process_with_torch(box):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.ones(256, 256) @ torch.ones(256, 256)  # intra-op threads are up
        results = []
        threads = [threading.Thread(target=lambda i=i: results.append(box.call("add", {"a": i, "b": 0}).content))
                   for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(before)
    assert sorted(results) == sorted(str(i) for i in range(8))


def test_the_worker_ends_with_its_parent(tools_file):
    """A process that never closes its ToolBox: the worker is gone after it exits, and after a kill -9."""
    for ending in ("pass", "os.kill(os.getpid(), 9)"):
        code = textwrap.dedent(f"""
            import os, sys
            from minimind_scale.agent.tools import load_tools
            box = load_tools(sys.argv[1])
            print(box.call("tell_pid", {{}}).content, flush=True)
            {ending}
        """)
        proc = subprocess.run([sys.executable, "-c", code, str(tools_file)], capture_output=True, text=True,
                              cwd=REPO, timeout=120)
        worker = int(proc.stdout.split()[0])
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _alive(worker):
            time.sleep(0.05)
        assert not _alive(worker), f"worker {worker} outlived its parent ({ending})"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_bad_tools_files_are_user_errors_naming_the_file(tmp_path):
    missing = tmp_path / "missing.py"
    with pytest.raises(UserError, match="tools file not found: .*missing.py"):
        load_tools(missing)
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n    pass\n")
    with pytest.raises(UserError, match=r"tools file .*broken.py failed to import: SyntaxError"):
        load_tools(broken)
    raising = tmp_path / "raising.py"
    raising.write_text("import no_such_module_here\n")
    with pytest.raises(UserError, match=r"raising.py failed to import: ModuleNotFoundError: No module named"):
        load_tools(raising)
    empty = tmp_path / "empty.py"
    empty.write_text("from json import dumps\nX = 1\ndef _private():\n    pass\n")
    with pytest.raises(UserError, match=r"empty.py defines no tool"):
        load_tools(empty)
    with pytest.raises(UserError, match="it is a directory"):
        load_tools(tmp_path)


def test_a_tools_file_imports_helpers_next_to_it(tmp_path):
    (tmp_path / "helper_mod.py").write_text("def triple(x):\n    return 3 * x\n")
    (tmp_path / "with_helper.py").write_text("from helper_mod import triple\n\ndef use(x):\n    return triple(x)\n")
    with load_tools(tmp_path / "with_helper.py") as box:
        assert box.names == ("use",)
        assert box.call("use", {"x": 4}).content == "12"


# ------------------------------------------------------------------------------------------- parsing

def test_parse_tool_calls():
    text = ('<think>\nI should compute.\n</think>\n\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
            '</tool_call>\n<tool_call>{"name": "add", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"a": 1</tool_call>'
            '<tool_call>["add"]</tool_call><tool_call>{"arguments": {}}</tool_call>'
            '<tool_call>{"name": "add", "arguments": "[1]"}</tool_call>'
            '<tool_call>{"function": {"name": "add", "arguments": {"a": 0, "b": 0}}}</tool_call>'
            '<tool_call>{"name": "get_current_time"}</tool_call><tool_call>{"name": "unclosed"}')
    calls = parse_tool_calls(text)
    assert len(calls) == 8
    assert (calls[0].name, calls[0].arguments, calls[0].error) == ("add", {"a": 1, "b": 2}, None)
    assert (calls[1].name, calls[1].arguments, calls[1].error) == ("add", {"a": 3, "b": 4}, None)  # OpenAI style
    assert calls[2].name is None and "not valid JSON" in calls[2].error
    assert "must be a JSON object, got list" in calls[3].error
    assert "no \"name\"" in calls[4].error
    assert calls[5].name == "add" and "arguments must be a JSON object, got list" in calls[5].error
    assert (calls[6].name, calls[6].arguments) == ("add", {"a": 0, "b": 0})
    assert (calls[7].name, calls[7].arguments, calls[7].error) == ("get_current_time", {}, None)
    assert calls[2].as_dict()["error"] == calls[2].error and "error" not in calls[0].as_dict()
    assert parse_tool_calls("no calls here") == []


def test_a_parsed_bad_block_runs_as_an_error_observation(box):
    bad = parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1</tool_call>')[0]
    r = box.run(bad)
    assert "not valid JSON" in error_of(r)
    good = parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 5}}</tool_call>')[0]
    assert box.run(good, allowed={"add"}).content == "6"


def test_declared_names_and_required_arguments():
    schemas = json.loads((AGENT_DATA / "schemas.json").read_text())
    names = {"calculate_math", "unit_converter", "get_current_weather", "get_current_time", "get_exchange_rate",
             "translate_text"}
    assert declared_tool_names(schemas) == names
    assert declared_tool_names(json.dumps(schemas)) == names  # the JSON text MiniMind's data carries
    assert declared_tool_names(None) == set() and declared_tool_names("") == set()
    assert declared_tool_names("not json") == set()
    assert declared_tool_names([{"name": "bare"}, {"type": "function"}, 3]) == {"bare"}
    by_name = tool_schemas(schemas)
    assert required_arguments(by_name["unit_converter"]) == ["value", "from_unit", "to_unit"]
    assert required_arguments(by_name["get_current_time"]) == []


# ------------------------------------------------------------------------------- the example tools

def test_the_example_tools_behave_like_minimind_s():
    with load_tools(AGENT_TOOLS) as box:
        def content(name, **arguments):
            r = box.call(name, arguments)
            return json.loads(r.content) if r.ok else r.error

        assert set(box.names) == declared_tool_names(json.loads((AGENT_DATA / "schemas.json").read_text()))
        assert content("calculate_math", expression="37 * 43") == {"result": "1591"}
        assert content("calculate_math", expression="2^10 + sqrt(16) - math.log(8, 2)") == {"result": "1025.0"}
        assert content("calculate_math", expression="（1 + 2）× 3 ÷ 2 − 1") == {"result": "3.5"}
        assert "unsupported expression" in content("calculate_math", expression="__import__('os').getcwd()")
        assert "unsupported expression" in content("calculate_math", expression="().__class__")
        assert "too large" in content("calculate_math", expression="9 ** 9 ** 9")
        assert content("unit_converter", value=10, from_unit="KM", to_unit="miles") == {"result": 6.2137}
        assert content("unit_converter", value=3, from_unit="parsec", to_unit="km") == {"result": 3.0}
        assert content("get_current_weather", location="London") == {
            "city": "London", "temperature": "5°C", "humidity": "65%", "condition": "小雨"}
        assert content("get_current_time") == {"datetime": "2025-03-07 14:30:00", "timezone": "Asia/Shanghai"}
        assert content("get_current_time", timezone="Asia/Tokyo")["datetime"] == "2025-03-07 15:30:00"
        assert content("get_exchange_rate", from_currency="USD", to_currency="CNY") == {
            "from": "USD", "to": "CNY", "rate": 7.21}
        assert content("get_exchange_rate", from_currency="XXX", to_currency="CNY")["rate"] == 1.0
        assert content("translate_text", text="Happy birthday", target_language="chinese") == {
            "translated_text": "生日快乐"}
        assert content("translate_text", text="unknown", target_language="french") == {"translated_text": "unknown"}
        assert "missing a required argument: 'location'" in content("get_current_weather")
