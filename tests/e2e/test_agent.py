"""The agent stage end to end: a tiny model that memorised one tool-calling conversation really calls the tool in
its rollouts and reads the result before answering; the trajectory metrics and the built-in reward are logged;
it runs on 2 processes under DDP and DeepSpeed ZeRO-3; a tools file that does not load stops it with exit 2."""
from __future__ import annotations

import json
import subprocess
import sys

from test_grpo import free_port

from conftest import REPO, cli_env, read_metrics, run_cli


def agent_args(memorised, out, steps: int, *extra: str) -> list[str]:
    model, tasks, tools = memorised
    return ["agent", "--model", str(model), "--data_path", str(tasks), "--tools", str(tools), "--out_dir", str(out),
            "--num_generations", "2", "--batch_size", "1", "--max_gen_len", "128", "--max_turns", "3",
            "--top_k", "1", "--thinking_ratio", "0", "--learning_rate", "1e-6", "--max_steps", str(steps),
            "--log_interval", "1", "--dtype", "fp32", "--num_proc", "1", "--seed", "1", "--save_interval", "0", *extra]


def test_agent_rollouts_call_the_tool_and_the_result_reaches_the_next_turn(tmp_path, data_cache,
                                                                          tool_memorised_model):
    out = tmp_path / "agent"
    run_cli(agent_args(tool_memorised_model, out, 2, "--log_completions", "2"), data_cache)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    first = rows[0]
    assert first["tool_calls_per_sample"] == 1.0 and first["tool_failure_ratio"] == 0.0
    assert first["turns_per_sample"] == 2.0 and first["unfinished_ratio"] == 0.0
    # The answer holds gt: the tool-alignment bonus plus 2.5 for the gt, less the repetition penalty.
    assert first["rewards/minimind_agent"] > 2.5
    for key in ("reward", "kl", "clip_ratio", "completion_length", "reward_std"):
        assert key in first, key
    logged = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    trajectory = json.loads(logged[0]["completion"])
    assert [m["role"] for m in trajectory] == ["assistant", "tool", "assistant"]
    assert "<tool_call>" in trajectory[0]["content"] and "calculate_math" in trajectory[0]["content"]
    assert json.loads(trajectory[1]["content"]) == {"result": "1591"}  # the real tool's answer
    assert "1591" in trajectory[2]["content"]


def test_agent_on_2_processes_under_ddp_and_zero3(tmp_path, data_cache, tool_memorised_model):
    run_cli(agent_args(tool_memorised_model, tmp_path / "ddp", 2), data_cache, nproc=2)
    out = tmp_path / "zero3"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "minimind_scale", *agent_args(tool_memorised_model, out, 2),
           "--deepspeed", str(REPO / "ds_configs" / "zero3.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=cli_env(data_cache))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for run in ("ddp", "zero3"):
        rows = read_metrics(tmp_path / run)
        assert [r["step"] for r in rows] == [1, 2] and rows[0]["world_size"] == 2, run
        assert rows[0]["tool_calls_per_sample"] == 1.0 and rows[0]["tool_failure_ratio"] == 0.0, run
        assert (tmp_path / run / "final" / "config.json").is_file()


def test_a_tools_file_that_does_not_load_stops_the_run_naming_it(tmp_path, data_cache, tool_memorised_model):
    broken = tmp_path / "broken_tools.py"
    broken.write_text("def calculate_math(expression):\n    return 1 +\n")
    proc = run_cli([*agent_args(tool_memorised_model, tmp_path / "run", 1), "--tools", str(broken)], data_cache,
                   check=False)
    assert proc.returncode == 2
    assert str(broken) in proc.stderr and "Traceback" not in proc.stderr
