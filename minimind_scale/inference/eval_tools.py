"""`eval-tools`: run a model on agent tasks with real tool calls, greedily, and report how many it solves.

Each task (MiniMind's agent_rl format, see `agent_data`) is played out by the same executor and
trajectory code the agent stage trains with: the model's `<tool_call>` blocks run the functions of
`--tools FILE.py`, their results come back as tool turns, up to `--max_turns` assistant turns. A
task passes when its trajectory finished (no call left pending, no turn cut by the length limit) and
every `gt` item appears in the final answer, by the rule of the `accuracy` reward.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Literal

from pydantic import Field

from minimind_scale.config import StrictConfig
from minimind_scale.errors import UserError
from minimind_scale.generation.registry import DEFAULT_BACKEND, BackendName, load_backend

SHOWN_CHARS = 80


class EvalToolsConfig(StrictConfig):
    """Play agent tasks out with real tool calls. Prints one line per task (pass/fail, its calls with their
    results, the final answer, shortened); the last stdout line is JSON: {"accuracy": share of tasks passed,
    "tasks": tasks, "tool_calls": calls the model wrote, "tool_failures": calls answered with an error}."""

    model: str = Field(..., description="Hugging Face model directory (e.g. out/agent/final)")
    data_path: list[str] = Field(default_factory=list, description="jsonl task files (agent_rl records with gt)")
    tools: str = Field(..., description="Python file whose public functions are the tools (examples/agent_tools.py)")
    max_turns: int = Field(3, ge=1, description="most assistant turns per task")
    max_new_tokens: int = Field(256, ge=1, description="most tokens per assistant turn")
    batch_size: int = Field(8, ge=1, description="tasks generated together")
    think: bool = Field(False, description="render prompts with an open think block (open_thinking)")
    timeout_sec: float = Field(1.0, gt=0, description="a tool call running longer is stopped (an error result)")
    max_result_chars: int = Field(2048, ge=1, description="tool results are cut to this many characters")
    details: str | None = Field(None, description="also write every task's trajectory (messages, calls, results) "
                                "to this jsonl file")
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="weights dtype: auto = bf16 on a GPU that supports it, else fp32")
    generation_backend: BackendName = DEFAULT_BACKEND


def _short(text: str, limit: int = SHOWN_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def task_line(where: str, passed: bool, calls: list[dict], results: list[str], answer: str) -> str:
    shown = []
    for i, call in enumerate(calls):
        args = call.get("arguments")
        text = f"{call.get('name') or '?'}({_short(json.dumps(args, ensure_ascii=False), 40)})"
        shown.append(text + (f" -> {_short(results[i], 40)}" if i < len(results) else " (not run)"))
    return (f"{'pass' if passed else 'FAIL'}  {where}  calls: {'; '.join(shown) or 'none'}  "
            f"answer: {_short(answer) or '(empty)'}")


def play(generator, tokenizer, tasks: list, toolbox, cfg: EvalToolsConfig) -> Iterator[dict]:
    """One result per task, in order: its trajectory, the tool calls and results, and whether it passed.
    `generator` is a generation backend, or a module that the hf backend then generates with."""
    from minimind_scale.agent.records import task_passed
    from minimind_scale.agent.trajectory import run_trajectories
    from minimind_scale.chat.markup import TURN_END

    end_id = tokenizer.convert_tokens_to_ids(TURN_END)
    for start in range(0, len(tasks), cfg.batch_size):
        chunk = tasks[start:start + cfg.batch_size]
        out = run_trajectories(generator, tokenizer, [t.messages for t in chunk], [t.tools for t in chunk], toolbox,
                               max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                               open_thinking=[cfg.think] * len(chunk), end_id=end_id, pad_id=tokenizer.pad_token_id)
        for i, task in enumerate(chunk):
            # Tasks here always have gt (read with require_gt), so the verdict is never None.
            passed = bool(task_passed(out.final_answer[i], out.unfinished[i], task.gt))
            yield {"task": task.where, "passed": passed, "gt": task.gt,
                   "prompt": task.messages, "completion": out.messages[i], "tool_calls": out.tool_calls[i],
                   "tool_results": out.tool_results[i], "tool_failures": out.tool_failures[i],
                   "turns": out.turns[i], "unfinished": out.unfinished[i], "final_answer": out.final_answer[i]}


def _open_details(path: str | None):
    """The --details file to write, or a context holding None without one."""
    if path is None:
        return contextlib.nullcontext(None)
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as e:
        raise UserError(f"--details {path}: cannot be written ({e.strerror})") from None


def _report(results: Iterator[dict], details) -> tuple[int, int, int]:
    """Print one line per task (and write its details); (tasks passed, tool calls, failed calls)."""
    passed = calls = failures = 0
    for result in results:
        passed += result["passed"]
        calls += len(result["tool_calls"])
        failures += result["tool_failures"]
        print(task_line(result["task"], result["passed"], result["tool_calls"], result["tool_results"],
                        result["final_answer"]), flush=True)
        if details is not None:
            details.write(json.dumps(result, ensure_ascii=False) + "\n")
    return passed, calls, failures


def run(cfg: EvalToolsConfig) -> None:
    from minimind_scale.agent.records import read_agent_tasks
    from minimind_scale.agent.tools import load_tools

    if not cfg.data_path:
        raise UserError("--data_path: give at least one jsonl task file")
    # The cheap checks first: a broken tools file or record should not wait for the model to load.
    with load_tools(cfg.tools, cfg.timeout_sec, cfg.max_result_chars) as toolbox:
        tasks = [t for path in cfg.data_path for t in read_agent_tasks(path, require_gt=True)]
        with _open_details(cfg.details) as details:
            generator, tokenizer = load_backend(cfg.generation_backend, cfg.model, dtype=cfg.dtype)
            with contextlib.closing(generator):
                passed, calls, failures = _report(play(generator, tokenizer, tasks, toolbox, cfg), details)
    print(json.dumps({"accuracy": passed / len(tasks), "tasks": len(tasks), "tool_calls": calls,
                      "tool_failures": failures}), flush=True)
