"""Agent tasks: MiniMind's agent_rl records -> (prompt messages, tool schemas, ground truth).

A record is `{"conversations": [system turn with "tools", user turn(s), optional trailing assistant
turn], "gt": [...]}`; the tools are a list of OpenAI function schemas or the JSON text of one (on the
system turn, or at the record's top level), the trailing assistant turn (MiniMind's files carry a
placeholder) is dropped, and `gt` holds the values a correct final answer contains. `task_passed` says
whether a played task is solved.
"""
from __future__ import annotations

import json
import numbers
from dataclasses import dataclass
from pathlib import Path

from minimind_scale.chat.messages import normalize_messages
from minimind_scale.errors import RecordError, UserError
from minimind_scale.rl.reward_builtins import accuracy


def _ground_truth(value) -> list:
    """`gt` as a list of strings and numbers (one value is a list of one; missing or null is empty)."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    for i, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, (str, numbers.Real)):
            where = f"gt[{i}]" if isinstance(value, list) else "gt"
            raise RecordError(where, f"must be a string or a number, got {type(item).__name__}")
    return [x for x in items if not (isinstance(x, str) and not x.strip())]


def agent_prompt(record: dict) -> tuple[list[dict], list | None, list]:
    """(messages up to the first assistant generation, tool schemas or None, gt list) of one record."""
    if not isinstance(record, dict):
        raise RecordError("record", f"must be a JSON object, got {type(record).__name__}")
    key = "conversations" if "conversations" in record else "messages" if "messages" in record else None
    if key is None:
        raise RecordError("conversations", "missing (an agent record has \"conversations\")")
    turns = record[key]
    if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant":
        turns = turns[:-1]  # the answer to be generated
    messages, tools = normalize_messages({**record, key: turns}, key=key, require_assistant=False)
    if not any(m["role"] == "user" for m in messages):
        raise RecordError(key, "has no user turn")
    if messages[-1]["role"] not in ("user", "tool"):
        raise RecordError(f"{key}[{len(messages) - 1}].role", "the prompt must end with a user (or tool) turn")
    return messages, tools, _ground_truth(record.get("gt"))


@dataclass
class AgentTask:
    where: str  # file:line, for messages
    messages: list[dict]
    tools: list | None
    gt: list


def read_agent_tasks(path: str | Path, require_gt: bool = False) -> list[AgentTask]:
    """Every record of a jsonl file; the first bad one is a UserError `file:line: field '...': reason`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    tasks = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                messages, tools, gt = agent_prompt(json.loads(raw.decode("utf-8")))
                if require_gt and not gt:
                    raise RecordError("gt", "missing or empty (a task needs the values its answer must contain)")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not UTF-8 text (bad byte at offset {e.start})") from None
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
            except RecordError as e:
                raise UserError(f"{where}: field '{e.field}': {e.reason}") from None
            tasks.append(AgentTask(where, messages, tools, gt))
    if not tasks:
        raise UserError(f"{path}: no task (the file has no non-blank line)")
    return tasks


def task_passed(final_answer: str, unfinished: bool, gt: list) -> bool | None:
    """Whether a played task is solved: its trajectory finished (no call left pending, no turn cut by the
    length limit) and every `gt` item appears in its final answer, by the `accuracy` reward's matching.
    None for a task without gt, which has nothing to check."""
    correct = accuracy(None, [final_answer], gt=[gt])[0]
    return None if correct is None else correct == 1.0 and not unfinished
