"""Reward functions for online RL, with TRL's calling convention so users' functions move between the two.

A reward function is called as ``f(prompts=..., completions=..., completion_ids=..., **columns)`` and
returns one value per completion:
  prompts         the conversation before each completion, a list of message dicts per completion;
  completions     ``[{"role": "assistant", "content": text}]`` per completion (plain strings are
                  accepted by the built-ins too);
  completion_ids  the sampled token ids per completion;
  columns         every other key of the data record, as one list per key (``gt=[...]``);
  result          a float per completion, or None where the function does not apply to it (a math
                  checker on a chat prompt); a None adds nothing to that completion's total.

Users name functions as ``FILE.py:FUNCTION``; every way such a function can be wrong (a missing
file, an import that fails, an exception on one sample, a wrong count, a string) surfaces as one
``UserError`` naming the file, the function and, where there is one, the sample.
"""
from __future__ import annotations

import importlib.util
import json
import math
import numbers
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minimind_scale.agent.tools import parse_tool_calls, required_arguments, tool_schemas
from minimind_scale.errors import UserError

THINK_END = "</think>"
# Keyword names the caller fills itself; record columns of the same name are not passed again.
RESERVED = ("prompts", "completions", "completion_ids")


@dataclass(frozen=True)
class RewardFunc:
    """A reward function with the name its logs use and where it came from, for error messages."""

    name: str
    fn: Callable[..., Any]
    source: str = "built-in"
    path: str | None = None  # the resolved file, to find the failing line in a traceback

    def __call__(self, prompts, completions, completion_ids, **columns):
        return self.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)

    @property
    def where(self) -> str:
        return f"built-in reward function '{self.name}'" if self.source == "built-in" else \
            f"reward function '{self.name}' in {self.source}"


# --------------------------------------------------------------------------------------------------
# built-ins

def completion_text(completion: Any) -> str:
    """The text of one completion: a plain string, or the contents of its messages joined in order."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    parts = []
    for message in completion:
        content = message.get("content", "") if isinstance(message, dict) else message
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}]
            content = "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
        parts.append("" if content is None else str(content))
    return "".join(parts)


_WORD_OR_MARK = re.compile(r"\w+|[^\w\s]")


def repetition_penalty(text: str, n: int = 3, cap: float = 0.5) -> float:
    """min(cap, 2·cap · repeated n-grams / n-grams) over lower-cased word-or-punctuation tokens.

    A text whose n-grams are all distinct pays nothing; one where at least half of them repeat an
    earlier one pays the whole cap. Tokens are runs of word characters or single punctuation marks,
    so "yes, yes, yes" repeats even though no two words are adjacent; a run of CJK characters is one
    token, which under-counts repetition inside Chinese text.
    """
    tokens = _WORD_OR_MARK.findall(text.lower())
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    repeated = len(grams) - len(set(grams))
    return min(cap, repeated * 2 * cap / len(grams))


def _minimind_format_one(text: str, min_chars: int = 20) -> float:
    reward = 0.5 if min_chars <= len(text.strip()) <= 800 else -0.5
    answer = text
    if THINK_END in text:
        thinking, after = text.split(THINK_END, 1)
        reward += 1.0 if 20 <= len(thinking.strip()) <= 300 else -0.5
        reward += 0.25 if text.count(THINK_END) == 1 else -0.25
        answer = after.strip()
    return reward - repetition_penalty(answer)


def minimind_format(prompts, completions, completion_ids=None, **columns) -> list[float]:
    """MiniMind's rule reward (train_grpo.py's ``calculate_rewards`` without its reward-model score).

    Per completion, with ``text`` the whole completion:
      +0.5 if 20 ≤ len(text.strip()) ≤ 800 characters, else −0.5 (the whole completion, thinking
           included: MiniMind measures the response, not the answer);
      if ``</think>`` occurs: split at its first occurrence into thinking and answer;
           +1.0 if 20 ≤ len(thinking.strip()) ≤ 300 else −0.5 (a leading ``<think>`` tag, if the
           model wrote one, counts toward the length, as in MiniMind);
           +0.25 if ``</think>`` occurs exactly once else −0.25;
           the answer is what follows the first ``</think>``, stripped;
      −repetition_penalty(answer): word-or-punctuation 3-grams of the lower-cased answer (the whole
           completion when there is no ``</think>``), min(0.5, repeated·2·0.5 / count).
    MiniMind's newer reward utilities count model-token 3-grams instead (so CJK text is not one
    word); this follows the train_grpo.py rule because it needs no tokenizer.
    """
    return [_minimind_format_one(completion_text(c)) for c in completions]


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?")
NUMERIC_TOLERANCE = 1e-6


def _as_number(value: Any) -> float | None:
    """A ground-truth item's numeric value, or None when it is text."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        x = float(value)
        return x if math.isfinite(x) else None
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value.strip().replace(",", ""))
    return None


def answer_text(text: str) -> str:
    """What follows the last ``</think>`` (the whole text without one), so thinking cannot earn credit."""
    return text.rsplit(THINK_END, 1)[-1] if THINK_END in text else text


def _matches(item: Any, answer: str, numbers_in_answer: list[float]) -> bool:
    x = _as_number(item)
    if x is not None:
        return any(abs(y - x) <= NUMERIC_TOLERANCE for y in numbers_in_answer)
    return str(item).strip().casefold() in answer.casefold()


def accuracy(prompts, completions, completion_ids=None, gt=None, **columns) -> list[float | None]:
    """1.0 when every ground-truth item of the ``gt`` column appears in the answer, else 0.0; None without gt.

    ``gt`` per sample is one value or a list of values (all must appear). The answer is the text after
    the last ``</think>`` (the whole completion if there is none). A numeric item (a number, or a
    string that is one, e.g. "1,000" or "0.5") matches a number in the answer within 1e-6, so "4" does
    not match "42" and 0.5 matches "0.50"; any other item matches as a case-insensitive substring. A
    sample whose gt is missing, None or an empty list is not applicable: None, not 0.
    """
    out: list[float | None] = []
    for i, c in enumerate(completions):
        items = None if gt is None else gt[i]
        if items is not None and not isinstance(items, (list, tuple)):
            items = [items]
        items = [x for x in (items or []) if x is not None]
        if not items:
            out.append(None)
            continue
        answer = answer_text(completion_text(c))
        found = [float(m.replace(",", "")) for m in _NUMBER.findall(answer)]
        out.append(1.0 if all(_matches(x, answer, found) for x in items) else 0.0)
    return out


# ---------------------------------------------------------------------------- minimind_agent

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
AGENT_CLIP = 3.0


def _turns(completion: Any) -> list[str]:
    """The assistant turns of a conversational completion (a plain text is one turn)."""
    if isinstance(completion, str):
        return [completion]
    if isinstance(completion, dict):
        completion = [completion]
    turns = [completion_text([m]) for m in completion if not isinstance(m, dict) or m.get("role", "assistant")
             == "assistant"]
    return turns or [""]


def _as_gt_list(value: Any) -> list:
    items = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
    return [x for x in items if x is not None]


def _call_is_valid(call: Any, schemas: dict[str, dict]) -> bool:
    """A declared tool, arguments an object (or its JSON text), every required parameter present and non-empty
    (0 and false count as given; None, "", whitespace, [] and {} do not)."""
    if not isinstance(call, dict) or call.get("error") is not None or call.get("name") not in schemas:
        return False
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return False
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return False

    def given(v):
        return v is not None and not (isinstance(v, str) and not v.strip()) and not (
            isinstance(v, (list, dict)) and not v)

    return all(given(arguments.get(r)) for r in required_arguments(schemas[call["name"]]))


def _agent_with_calls(answers: list[str], calls: list, schemas: dict, gt: list, unfinished: bool) -> float:
    valid = sum(_call_is_valid(c, schemas) for c in calls)
    gap = abs(valid - len(gt)) + (len(calls) - valid)  # missing or extra valid calls, plus every invalid one
    reward = 0.5 if gap == 0 else -0.5 * gap
    answer = answers[-1]
    final = "" if unfinished else answer.rsplit(TOOL_CALL_CLOSE, 1)[-1]
    if gt:
        numbers_found = [float(m.replace(",", "")) for m in _NUMBER.findall(final)]
        reward += 2.5 * sum(_matches(x, final, numbers_found) for x in gt) / len(gt)
    if unfinished:
        reward -= 0.5
    return reward - repetition_penalty(final or answer)


def minimind_agent(prompts, completions, completion_ids=None, tools=None, gt=None, unfinished=None,
                   tool_calls=None, **columns) -> list[float]:
    """MiniMind's tool-use trajectory reward (train_agent.py's ``calculate_rewards``, without its
    reward-model score), clipped to ±3.

    A completion is a trajectory: assistant turns and tool turns (a plain text is one assistant turn).
    Columns: ``tools`` the declared schemas (a list of OpenAI function schemas or its JSON text),
    ``gt`` the values the final answer must contain, ``unfinished`` whether the trajectory stopped
    still calling tools or cut by the length limit (default false), ``tool_calls`` the calls made
    (dicts with ``name``, ``arguments`` and, for a malformed block, ``error``; default: parsed from
    the turns). Each turn's answer is its text after the last ``</think>``.
      −0.5 per unbalanced ``<tool_call>``/``</tool_call>`` tag, per turn;
      with calls: a call is valid when its tool is declared and every ``required`` parameter of the
           schema is present and non-empty; gap = |valid − len(gt)| + invalid calls; +0.5 when the
           gap is 0, else −0.5·gap; the final text is the last turn's answer after its last
           ``</tool_call>`` ("" when unfinished); +2.5 × the share of gt items found in it (the
           ``accuracy`` matching: numbers numerically, text as a case-insensitive substring);
           −0.5 when unfinished; −repetition_penalty(final text, or the last answer when empty);
      without calls: MiniMind's format score of the last turn (``minimind_format`` with a 5-character
           minimum length instead of 20), which includes its repetition penalty.
    """
    out = []
    for i, completion in enumerate(completions):
        turns = _turns(completion)
        answers = [answer_text(t).strip() for t in turns]
        reward = -0.5 * sum(abs(a.count(TOOL_CALL_OPEN) - a.count(TOOL_CALL_CLOSE)) for a in answers)
        calls = tool_calls[i] if tool_calls is not None else None
        if isinstance(calls, str):  # a column that went through JSON text
            calls = json.loads(calls) if calls.strip() else []
        if calls is None:
            calls = [c.as_dict() for a in answers for c in parse_tool_calls(a)]
        if calls:
            reward += _agent_with_calls(answers, list(calls), tool_schemas(None if tools is None else tools[i]),
                                        _as_gt_list(None if gt is None else gt[i]),
                                        bool(unfinished[i]) if unfinished is not None else False)
        else:
            reward += _minimind_format_one(turns[-1], min_chars=5)
        out.append(max(-AGENT_CLIP, min(AGENT_CLIP, reward)))
    return out


BUILTIN_REWARDS: dict[str, Callable[..., list]] = {"accuracy": accuracy, "minimind_format": minimind_format,
                                                   "minimind_agent": minimind_agent}


# --------------------------------------------------------------------------------------------------
# loading

def _builtin_list() -> str:
    return ", ".join(sorted(BUILTIN_REWARDS))


def _import_file(path: Path, shown: str):
    module_name = f"minimind_scale_reward_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"reward file {shown}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered while it runs so that dataclasses and pickling inside it find their module; the
    # file's folder is importable so it can use helper modules next to it.
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        sys.modules.pop(module_name, None)
        raise UserError(f"reward file {shown} failed to import: {type(e).__name__}: {e}") from None
    finally:
        try:
            sys.path.remove(str(path.parent))
        except ValueError:
            pass
    return module


def load_reward_funcs(specs: Sequence[str], base_dir: str | Path | None = None) -> list[RewardFunc]:
    """One RewardFunc per spec: a built-in name, or ``FILE.py:FUNCTION`` (relative to ``base_dir``, else the cwd).

    Names must be distinct, because logs and per-function results are keyed by them.
    """
    if isinstance(specs, str):
        specs = [specs]
    modules: dict[Path, Any] = {}
    out: list[RewardFunc] = []
    for spec in specs:
        spec = str(spec).strip()
        if spec in BUILTIN_REWARDS:
            func = RewardFunc(spec, BUILTIN_REWARDS[spec])
        else:
            file_part, sep, attr = spec.rpartition(":")
            if not sep or not file_part.endswith(".py"):
                hint = " (a file needs its function: FILE.py:FUNCTION)" if spec.endswith(".py") else ""
                raise UserError(f"unknown reward function '{spec}'{hint}; built-ins: {_builtin_list()}, "
                                f"or FILE.py:FUNCTION for your own")
            if not attr.isidentifier():
                raise UserError(f"reward function '{spec}': '{attr}' is not a Python function name")
            path = Path(file_part).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = Path(base_dir) / path
            if not path.is_file():
                raise UserError(f"reward file not found: {path}" + (" (it is a directory)" if path.is_dir() else ""))
            path = path.resolve()
            if path not in modules:
                modules[path] = _import_file(path, file_part)
            if not hasattr(modules[path], attr):
                raise UserError(f"reward file {file_part} has no function '{attr}'")
            fn = getattr(modules[path], attr)
            if not callable(fn):
                raise UserError(f"{file_part}:{attr} is not callable (it is a {type(fn).__name__} value)")
            func = RewardFunc(attr, fn, source=file_part, path=str(path))
        if any(f.name == func.name for f in out):
            raise UserError(f"two reward functions are named '{func.name}'; rename one (logs are keyed by name)")
        out.append(func)
    return out


# --------------------------------------------------------------------------------------------------
# scoring

def _slice(values, i: int):
    return values[i:i + 1]


def _failure(func: RewardFunc, e: BaseException, sample: int | None) -> UserError:
    line = ""
    if func.path is not None:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == func.path]
        if frames:
            line = f" (line {frames[-1].lineno})"
    on = f" on sample {sample}" if sample is not None else ""
    hint = ""
    if isinstance(e, TypeError) and "keyword argument" in str(e):
        hint = (" (reward functions are called with the keywords prompts, completions, completion_ids and one per "
                "record column; accept the rest with **kwargs)")
    return UserError(f"{func.where} raised {type(e).__name__}{on}{line}: {e}{hint}")


def _call(func: RewardFunc, prompts, completions, completion_ids, columns: dict[str, list]) -> list:
    try:
        return func(prompts, completions, completion_ids, **columns)
    except Exception as batch_error:
        # Find the sample: re-run one at a time. A function that only fails on the whole batch is
        # reported without an index.
        for i in range(len(completions)):
            one = {k: _slice(v, i) for k, v in columns.items()}
            try:
                func(_slice(prompts, i), _slice(completions, i), _slice(completion_ids, i), **one)
            except Exception as e:
                raise _failure(func, e, i) from None
        raise _failure(func, batch_error, None) from None


def _check_values(func: RewardFunc, values: Any, n: int) -> list[float | None]:
    if not isinstance(values, (list, tuple)) and hasattr(values, "tolist"):  # a tensor or an array
        values = values.tolist()
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, Sequence):
        raise UserError(f"{func.where} returned a {type(values).__name__}; it must return a list with one float "
                        f"(or None) per completion")
    if len(values) != n:
        raise UserError(f"{func.where} returned {len(values)} values for {n} completions")
    out: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        if not isinstance(v, numbers.Real):
            raise UserError(f"{func.where} returned a non-numeric value for sample {i}: {v!r} "
                            f"({type(v).__name__}); return a float, or None where it does not apply")
        x = float(v)
        if not math.isfinite(x):
            raise UserError(f"{func.where} returned {x} for sample {i}; rewards must be finite (None means "
                            f"'does not apply')")
        out.append(x)
    return out


def score_completions(funcs: Sequence[RewardFunc], weights: Sequence[float] | None, prompts: list,
                      completions: list, completion_ids: list,
                      columns: dict[str, list] | None = None) -> tuple[torch.Tensor, dict[str, list[float | None]]]:
    """(weighted total per completion [n] float32, per-function values by name).

    total_i = Σ_f w_f · v_f,i over the functions with a value for sample i; a None contributes
    nothing, so it is neither a 0 in the total's sense of "bad" nor counted in ``reward_means``. A
    sample for which every function returned None gets a total of 0. ``weights`` None means 1 each.
    Record columns named like the call's own arguments (``prompts``, ``completions``,
    ``completion_ids``) are not passed a second time.
    """
    n = len(completions)
    if len(prompts) != n or len(completion_ids) != n:
        raise ValueError(f"{len(prompts)} prompts, {n} completions and {len(completion_ids)} completion_ids")
    columns = {k: v for k, v in (columns or {}).items() if k not in RESERVED}
    for k, v in columns.items():
        if len(v) != n:
            raise ValueError(f"column '{k}' has {len(v)} values for {n} completions")
    if weights is None:
        weights = [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise UserError(f"reward_weights has {len(weights)} values for {len(funcs)} reward functions")
    totals = [0.0] * n
    per_function: dict[str, list[float | None]] = {}
    for func, w in zip(funcs, weights):
        values = _check_values(func, _call(func, prompts, completions, completion_ids, columns), n)
        per_function[func.name] = values
        for i, v in enumerate(values):
            if v is not None:
                totals[i] += float(w) * v
    return torch.tensor(totals, dtype=torch.float32), per_function


def reward_means(per_function: dict[str, list[float | None]], prefix: str = "rewards/") -> dict[str, float | None]:
    """Each function's mean over the samples it applied to, keyed ``rewards/<name>``; None if it applied to none."""
    out: dict[str, float | None] = {}
    for name, values in per_function.items():
        present = [v for v in values if v is not None]
        out[f"{prefix}{name}"] = sum(present) / len(present) if present else None
    return out
