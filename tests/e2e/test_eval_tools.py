"""`eval-tools` through the real command line: the memorised model calls the tool, reads its result and
answers; a broken tools file or task record exits 2 with a message naming it."""
from __future__ import annotations

import json

from conftest import cli_in_process, run_cli


def test_the_model_calls_the_tool_and_answers_with_its_result(tool_memorised_model, data_cache, tmp_path):
    model_dir, tasks_file, tools_file = tool_memorised_model
    details = tmp_path / "details.jsonl"
    proc = run_cli(["eval-tools", "--model", str(model_dir), "--data_path", str(tasks_file), "--tools", str(tools_file),
                    "--max_turns", "3", "--max_new_tokens", "96", "--dtype", "fp32", "--details", str(details)],
                   data_cache)
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"accuracy": 1.0, "tasks": 1, "tool_calls": 1, "tool_failures": 0}
    assert len(lines) == 2
    assert lines[0].startswith(f"pass  {tasks_file}:1  calls: calculate_math(")
    assert '-> {"result": "1591"}' in lines[0] and lines[0].endswith("answer: 37 * 43 = 1591.")

    [row] = [json.loads(line) for line in details.read_text().splitlines()]
    assert row["passed"] and row["turns"] == 2 and not row["unfinished"]
    assert row["tool_calls"] == [{"name": "calculate_math", "arguments": {"expression": "37 * 43"}}]
    # the tool's real result is the observation the model read before its final answer
    roles = [m["role"] for m in row["completion"]]
    assert roles == ["assistant", "tool", "assistant"]
    assert row["completion"][1]["content"] == row["tool_results"][0] == '{"result": "1591"}'
    assert "1591" not in row["completion"][0]["content"] and "1591" in row["final_answer"]


def test_a_tools_file_that_does_not_load_exits_2_naming_it(tool_memorised_model, tmp_path, capsys):
    model_dir, tasks_file, _ = tool_memorised_model
    broken = tmp_path / "broken_tools.py"
    broken.write_text("import no_such_module_anywhere\n")
    code, err = cli_in_process(["eval-tools", "--model", str(model_dir), "--data_path", str(tasks_file),
                                "--tools", str(broken)], capsys)
    assert code == 2
    assert f"tools file {broken} failed to import: ModuleNotFoundError" in err and "Traceback" not in err
    code, err = cli_in_process(["eval-tools", "--model", str(model_dir), "--data_path", str(tasks_file),
                                "--tools", str(tmp_path / "absent.py")], capsys)
    assert code == 2 and "tools file not found" in err and "absent.py" in err


def test_a_bad_record_exits_2_with_file_line_and_field(tool_memorised_model, tmp_path, capsys):
    model_dir, tasks_file, tools_file = tool_memorised_model
    good = tasks_file.read_text().strip()
    cases = {
        "no_gt": (json.dumps({**json.loads(good), "gt": []}), "field 'gt': missing or empty"),
        "bad_tools": (json.dumps({"conversations": [{"role": "system", "content": "", "tools": "[{"},
                                                    {"role": "user", "content": "hi"}], "gt": ["x"]}),
                      "field 'conversations[0].tools': tools is not valid JSON"),
        "no_user": (json.dumps({"conversations": [{"role": "system", "content": "s"}], "gt": ["x"]}),
                    "field 'conversations': has no user turn"),
        "bad_gt": (json.dumps({**json.loads(good), "gt": [{"value": 1}]}),
                   "field 'gt[0]': must be a string or a number"),
        "not_json": ("{not json", "not valid JSON"),
    }
    for name, (line, message) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(good + "\n\n" + line + "\n")  # a blank line: the bad record is line 3
        code, err = cli_in_process(["eval-tools", "--model", str(model_dir), "--data_path", str(path),
                                    "--tools", str(tools_file)], capsys)
        assert code == 2, name
        assert f"{path}:3: {message}" in err, (name, err)
