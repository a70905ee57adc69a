"""The built-in reward functions: MiniMind's rule rewards and an answer checker, by name in `BUILTIN_REWARDS`.

`minimind_format` scores a reply's shape (length, think block, repetition), `accuracy` whether the answer
holds the record's ground truth, and `minimind_agent` a tool-use trajectory (its calls against the declared
tool schemas, then its final answer). Each follows the calling convention `reward_funcs` describes.
"""
from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Callable
from typing import Any

from minimind_scale.chat.markup import THINK_CLOSE, TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from minimind_scale.chat.reply_parser import answer_text
from minimind_scale.chat.tool_calls import parse_tool_calls, required_arguments, tool_schemas


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
    if THINK_CLOSE in text:
        thinking, after = text.split(THINK_CLOSE, 1)
        reward += 1.0 if 20 <= len(thinking.strip()) <= 300 else -0.5
        reward += 0.25 if text.count(THINK_CLOSE) == 1 else -0.25
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
