"""The stage registry: a stage is data (a StageSpec), registered through one public function.

Built-in stages and users' stages arrive the same three ways:
  * installed packages declare an entry point in the group ``minimind_scale.stages`` whose value is a
    StageSpec (the built-ins are declared this way in pyproject.toml);
  * ``--plugin path/to/file.py`` on the command line;
  * ``MINIMIND_SCALE_PLUGINS=a.py:b.py`` in the environment.
A plugin file registers its stage by calling ``register_stage(StageSpec(...))``.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import BaseModel, ConfigDict, field_validator

from .config import TrainConfig
from .errors import UserError

ENTRY_POINT_GROUP = "minimind_scale.stages"
PLUGIN_ENV = "MINIMIND_SCALE_PLUGINS"


class StageSpec(BaseModel):
    """Everything that makes one training stage different from another.

    encode(record, tokenizer, cfg) -> dict of columns for one raw jsonl record; raise RecordError
        for a malformed record. Run through ``datasets.map`` once and cached.
    collate(rows, tokenizer, cfg) -> dict of tensors for a list of encoded rows.
    loss(model, batch, cfg, ctx) -> LossOutput: the SUM of the loss over the batch's loss units
        (tokens for language modelling, pairs for preference losses) plus metric sums.
    loss_units(batch) -> int: how many units the batch's loss sums over; the engine uses it to
        normalise an optimizer step over every micro-batch and rank.
    setup(model, cfg, ctx) -> model: optional changes after loading (adapters, frozen parts,
        auxiliary models stored in ctx).
    finalize(model, tokenizer, final_dir, cfg, ctx): optional extra outputs after final/ is written,
        on the main process (e.g. a merged copy of an adapter model).
    packable: whether rows may be packed (every column is per-token and aligned with input_ids).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    name: str
    help: str
    config: type[TrainConfig]
    encode: Callable[..., dict]
    collate: Callable[..., dict]
    loss: Callable[..., Any]
    loss_units: Callable[[dict], Any]
    setup: Optional[Callable[..., Any]] = None
    finalize: Optional[Callable[..., Any]] = None
    aliases: tuple[str, ...] = ()
    packable: bool = True
    # Config fields that change the tokenised data; they join the cache key.
    data_fields: tuple[str, ...] = ()

    @field_validator("config")
    @classmethod
    def _config_extends_train_config(cls, v):
        if not (isinstance(v, type) and issubclass(v, TrainConfig)):
            raise ValueError("config must be a subclass of minimind_scale.config.TrainConfig")
        return v


_STAGES: dict[str, StageSpec] = {}
_ALIASES: dict[str, str] = {}
_discovered = False


def register_stage(spec: StageSpec) -> StageSpec:
    """Make a stage available as ``python -m minimind_scale NAME``. Re-registering the same spec is a no-op."""
    if not isinstance(spec, StageSpec):
        raise TypeError(f"register_stage expects a StageSpec, got {type(spec).__name__}")
    existing = _STAGES.get(spec.name)
    if existing is not None and existing is not spec:
        # Importing one file twice (entry point + --plugin) gives an equal spec from a new module object.
        if existing.config.__qualname__ != spec.config.__qualname__ or existing.encode.__module__ != spec.encode.__module__:
            raise UserError(f"two different stages are named '{spec.name}'")
    _STAGES[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


def load_plugin_file(path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"plugin file not found: {path}")
    module_name = f"minimind_scale_plugin_{p.stem}_{abs(hash(str(p.resolve())))}"
    if module_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(module_name, p)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: the plugin failed to load: {type(e).__name__}: {e}") from None


def discover(plugin_files: Optional[list[str]] = None) -> None:
    """Load entry-point stages once, then any plugin files (environment first, then arguments)."""
    global _discovered
    if not _discovered:
        _discovered = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            obj = ep.load()
            if isinstance(obj, StageSpec):
                register_stage(obj)
    env = [p for p in os.environ.get(PLUGIN_ENV, "").split(os.pathsep) if p]
    for path in env + list(plugin_files or []):
        load_plugin_file(path)


def get_stage(name: str) -> StageSpec:
    name = _ALIASES.get(name, name)
    if name not in _STAGES:
        from .config import did_you_mean

        raise UserError(f"unknown stage '{name}'{did_you_mean(name, all_names())}; stages: {', '.join(sorted(_STAGES))}")
    return _STAGES[name]


def stages() -> list[StageSpec]:
    return [ _STAGES[k] for k in sorted(_STAGES) ]


def all_names() -> list[str]:
    return sorted(_STAGES) + sorted(_ALIASES)
