"""Scoring completions with reward functions: the weighted total per completion, and clear errors.

`score_completions` calls every `RewardFunc` on a batch, checks what each returns (one finite float or
None per completion) and sums the weighted values. A function that raises is re-run one sample at a time
to name the sample that fails, and the error names the function, its file and the failing line, so a bug
in a user's reward is a ``UserError`` to fix rather than a traceback to read.
"""
from __future__ import annotations

import math
import numbers
import traceback
from collections.abc import Sequence
from typing import Any

import torch

from minimind_scale.errors import UserError
from minimind_scale.rl.reward_funcs import RESERVED, RewardFunc


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
    nothing, so it is neither a 0 in the total's sense of "bad" nor counted in a function's logged
    mean. A sample for which every function returned None gets a total of 0. ``weights`` None means
    1 each. Record columns named like the call's own arguments (``prompts``, ``completions``,
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
