"""What a reward function is for online RL, and finding one by name: a built-in or ``FILE.py:FUNCTION``.

A reward function follows TRL's calling convention, so users' functions move between the two. It is
called as ``f(prompts=..., completions=..., completion_ids=..., **columns)`` and returns one value per
completion:
  prompts         the conversation before each completion, a list of message dicts per completion;
  completions     ``[{"role": "assistant", "content": text}]`` per completion (plain strings are
                  accepted by the built-ins too);
  completion_ids  the sampled token ids per completion;
  columns         every other key of the data record, as one list per key (``gt=[...]``);
  result          a float per completion, or None where the function does not apply to it (a math
                  checker on a chat prompt); a None adds nothing to that completion's total.

`load_reward_funcs` resolves names into `RewardFunc`s; every way a user's file can be wrong before it
runs (missing, failing to import, lacking the function) is a ``UserError`` naming the file and the
function. What can go wrong when it runs is `reward_scoring`'s to report.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minimind_scale.errors import UserError
from minimind_scale.rl.reward_builtins import BUILTIN_REWARDS

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


def _file_func(spec: str, base_dir: str | Path | None, modules: dict[Path, Any]) -> RewardFunc:
    """The function a ``FILE.py:FUNCTION`` spec names; `modules` caches each file's module, so that two
    functions of one file share it."""
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
    return RewardFunc(attr, fn, source=file_part, path=str(path))


def reward_func_name(spec: str) -> str:
    """The name a reward spec's function is logged under, without loading it: a built-in's own name, or the
    FUNCTION of ``FILE.py:FUNCTION`` (as `load_reward_funcs` names it)."""
    spec = str(spec).strip()
    return spec if spec in BUILTIN_REWARDS else spec.rpartition(":")[2]


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
        func = RewardFunc(spec, BUILTIN_REWARDS[spec]) if spec in BUILTIN_REWARDS else \
            _file_func(spec, base_dir, modules)
        if any(f.name == func.name for f in out):
            raise UserError(f"two reward functions are named '{func.name}'; rename one (logs are keyed by name)")
        out.append(func)
    return out
