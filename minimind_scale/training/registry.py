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
import inspect
import os
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from minimind_scale.config import TrainConfig
from minimind_scale.errors import UserError
from minimind_scale.training.context import StageState

ENTRY_POINT_GROUP = "minimind_scale.stages"
PLUGIN_ENV = "MINIMIND_SCALE_PLUGINS"


class StageSpec(BaseModel):
    """Everything that makes one training stage different from another.

    encode(record, tokenizer, cfg) -> dict of columns for one raw jsonl record; raise RecordError
        for a malformed record. Run through ``datasets.map`` once and cached.
    encode_batch(records, tokenizer, cfg) -> list with one entry per record, in order: the dict
        `encode` returns for it, or the RecordError `encode` raises for it (returned, not raised, so
        one bad record never stops the others). Optional; when given, data preparation uses it instead
        of `encode` on each batch of parsed records (e.g. to render every record, then tokenise them in
        one call). It must equal `encode` record by record; `encode` stays required (the first record's
        columns are probed with it, and other code may encode one record). A RecordError raised out of
        encode_batch itself makes that batch fall back to `encode`, record by record.
    collate(rows, tokenizer, cfg) -> dict of tensors for a list of encoded rows.
    loss(model, batch, cfg, ctx) -> LossOutput: the SUM of the loss over the batch's loss units
        (tokens for language modelling, pairs for preference losses) plus metric sums.
    loss_units(batch) -> int: how many units the batch's loss sums over; the engine uses it to
        normalise an optimizer step over every micro-batch and rank. Required, except for a stage
        whose rollout counts its micro-batches itself (see the batch contract below).
    token_counts(batch) -> (loss-bearing tokens, real input tokens): optional; what the engine logs
        as `tokens` and bases throughput and MFU on. Default: batching.token_counts, which counts a
        causal-LM batch (labels; attention_mask, or a packed batch's REAL_TOKENS).
    check(cfg): optional; checks that need neither data nor a model (files the config names, such as a
        reward function file), run before tokenising; raise UserError.
    build_model(cfg, tokenizer) -> model: optional; the model to train, built whole (default: a causal
        LM from `cfg.model`, a preset or a Hugging Face directory). A reward model or a critic is a
        different transformers class on the same backbone.
    setup(model, cfg, ctx) -> model: optional changes after loading (adapters, frozen parts,
        auxiliary models kept in ctx.state).
    rollout(model, batches, cfg, ctx) -> list of micro-batches: optional. Where an optimizer step's
        micro-batches come from when the stage makes them itself (generate, score, then train): it
        gets the collated loader batches of one step on this process and returns the micro-batches
        to train on. The engine runs it without gradients, in eval mode, on the unwrapped model (its
        parameters gathered under ZeRO-3), and normalises the loss over what it returned. It returns a
        list of micro-batches (dicts or CountedBatch objects) or a context.Rollout (micro-batches plus
        metrics of its own).
    steps_per_rollout(cfg) -> int: optional; how many optimizer steps train on one rollout (GRPO's
        num_iterations). Checkpoints and stops wait for the last of them, so a resumed run never
        needs a rollout it did not save.
    stop_reusing(metrics, cfg) -> bool: optional; asked after each optimizer step on a rollout with that
        step's metrics (already reduced over every process, so all processes decide alike); True skips
        the rollout's remaining steps (PPO's early stop at target_kl). A skipped step still advances
        the step counter and the learning-rate schedule, so --max_steps and --epochs keep their meaning.
    learning_rates(cfg) -> {parameter-name prefix: learning rate}: optional; parameters under a prefix
        train at their own peak rate (a critic beside its policy); the rest use --learning_rate. The
        schedule scales every rate alike.
    final_models(model) -> {subdirectory: module}: optional; what final/ holds when the trained module
        is a container of several models ('' is final/ itself, e.g. {'': policy, 'critic': critic}).
        Each is saved in Hugging Face format; default: the model itself in final/.
    finalize(model, tokenizer, final_dir, cfg, ctx): optional extra outputs after final/ is written,
        on the main process (e.g. a merged copy of an adapter model).
    state: the class of the stage's own state (a context.StageState), created once per run as ctx.state.

    The batch contract (training/batch.py): a micro-batch is either
      * a dict of tensors, as `collate` returns it: the engine counts it with `loss_units(batch)` and
        `token_counts(batch)` and hands the dict to `loss`; or
      * a batch.CountedBatch, as a rollout may return it: its counts (loss units, loss-bearing and
        input tokens) travel with it, and `loss` receives its `.tensors`. A stage whose rollout
        returns only CountedBatch objects needs no `loss_units`.
    The engine reads nothing else from a batch but the width of `input_ids` (for FLOPs per token).
    The one key the engine adds is loader.ROW_INDEX on each row, for a stage that declares `row_index`.

    Evaluation (`eval`, and a held-out set during training): what measuring a model of this stage
    needs to know, declared here so that the evaluator names no stage.
    record_keys: top-level keys of a record in this stage's data format, any one of which identifies
        it (pretrain: "text"); `recognizes(record)` asks them, e.g. for `eval --stage auto`.
    eval_overrides: config fields set while evaluating, e.g. the SFT family's augmentations off, so
        that the data is measured as it is written.
    eval_metrics: names of the loss's metrics that evaluation reports, each as its mean over the loss
        units (a reward model's accuracy and margin); empty: a causal LM's next-token loss and
        perplexity. `eval` runs `collate` and `loss` with no StageContext (ctx None), so it offers only
        stages whose loss needs none; validation during training passes the run's, with
        `ctx.evaluating` set to the held-out set's name and `ctx.dataset` to its rows.
    perplexity_of: the evaluation metric that is a mean next-token cross-entropy ("loss" for the
        causal-LM stages, "ce_loss" for distillation); validation also logs its exp as `ppl`.
    evaluate(model, batch, cfg, ctx) -> {metric: (sum, count)}: optional; how validation during training
        measures one collated batch of a held-out set when not by the loss (an online stage: generate
        with a fixed seed and score). The engine sums each metric's sums and counts over batches and
        processes and logs sum / count. Runs without gradients, in eval mode, on the unwrapped model.
        Without it, a batch is measured by `loss`: the loss (less its `regularizer_sum`) per loss unit,
        and each of `eval_metrics`.
    eval_metric_names(cfg) -> names: required with `evaluate`; the metrics it reports, known before
        anything loads so that --save_best_metric can be checked.
    units_name: what `loss_units` counts, as a plural noun (tokens, pairs); evaluation reports the
        count of units under this name.
    model_kind: what final/ holds, for the tools that load it: "causal_lm", or "reward_model" (a
        sequence classifier with one output).

    Capabilities: options the engine applies only where the stage declares it can honour them; a run
    that sets one for a stage that does not is refused before anything is loaded.
    packable: rows may be packed (every column is per-token and aligned with input_ids).
    fixed_length: collate pads to batching.padded_length(cfg), so `pad_to max_seq_len` applies (and
        packed rows under `compile` get one shape).
    cross_entropy_variants: the loss computes its next-token cross-entropy with losses.causal_lm_loss,
        so `cross_entropy chunked|liger` applies.
    row_index: rows reach collate with loader.ROW_INDEX, their position in the data set (for per-row
        state computed once, such as precomputed reference log-probabilities).
    record_positions: data preparation also tells the encoders where each record lies:
        `encode(record, tokenizer, cfg, position=p)` and `encode_batch(records, tokenizer, cfg, positions=[...])`,
        each a record_draws.RecordPosition (file index among --data_path, 1-based line), for per-record
        random choices that must come out the same in every prepare (`position.draw(cfg.seed, "...")`).
        Put the options such choices read, and `seed`, in data_fields.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    name: str
    help: str
    config: type[TrainConfig]
    encode: Callable[..., dict]
    encode_batch: Callable[..., list] | None = None
    collate: Callable[..., dict]
    loss: Callable[..., Any]
    loss_units: Callable[[dict], Any] | None = None
    token_counts: Callable[[dict], tuple[Any, Any]] | None = None
    check: Callable[..., Any] | None = None
    build_model: Callable[..., Any] | None = None
    setup: Callable[..., Any] | None = None
    rollout: Callable[..., Any] | None = None
    steps_per_rollout: Callable[..., int] | None = None
    stop_reusing: Callable[..., bool] | None = None
    learning_rates: Callable[..., dict[str, float]] | None = None
    final_models: Callable[..., dict[str, Any]] | None = None
    finalize: Callable[..., Any] | None = None
    state: type[StageState] = StageState
    aliases: tuple[str, ...] = ()
    packable: bool = True
    fixed_length: bool = False
    cross_entropy_variants: bool = False
    row_index: bool = False
    record_positions: bool = False
    # Config fields that change the tokenised data; they join the cache key.
    data_fields: tuple[str, ...] = ()
    # Columns of `encode`'s output that hold one value per row instead of token ids, with their
    # datasets dtype: {"margin": "float32"}, {"prompt": "string"} (e.g. JSON text).
    value_columns: dict[str, str] = {}
    record_keys: tuple[str, ...] = ()
    eval_overrides: dict[str, Any] = {}
    eval_metrics: tuple[str, ...] = ()
    perplexity_of: str | None = None
    evaluate: Callable[..., dict[str, tuple[Any, Any]]] | None = None
    eval_metric_names: Callable[..., list[str]] | None = None
    units_name: str = "tokens"
    model_kind: Literal["causal_lm", "reward_model"] = "causal_lm"

    @field_validator("config")
    @classmethod
    def _config_extends_train_config(cls, v):
        if not (isinstance(v, type) and issubclass(v, TrainConfig)):
            raise ValueError("config must be a subclass of minimind_scale.config.TrainConfig")
        return v

    @field_validator("state")
    @classmethod
    def _state_extends_stage_state(cls, v):
        if not (isinstance(v, type) and issubclass(v, StageState)):
            raise ValueError("state must be a subclass of minimind_scale.StageState")
        return v

    @model_validator(mode="after")
    def _counted_and_evaluable(self):
        if self.loss_units is None and self.rollout is None:
            raise ValueError(f"stage '{self.name}': loss_units is required (only a stage whose rollout returns "
                             "CountedBatch micro-batches may leave it out)")
        if (self.evaluate is None) != (self.eval_metric_names is None):
            raise ValueError(f"stage '{self.name}': evaluate and eval_metric_names go together")
        unknown = sorted(set(self.eval_overrides) - set(self.config.model_fields))
        if unknown:
            raise ValueError(f"stage '{self.name}': eval_overrides names {unknown}, which its config does not have")
        return self

    def validation_metrics(self, cfg) -> list[str]:
        """The metric names validation during training logs for each held-out set of this stage."""
        if self.evaluate is not None:
            return list(self.eval_metric_names(cfg))
        return ["loss", *self.eval_metrics, *(["ppl"] if self.perplexity_of else [])]

    def recognizes(self, record: Any) -> bool:
        """Whether `record` (one parsed jsonl line) is in this stage's data format, by its `record_keys`."""
        return isinstance(record, dict) and any(key in record for key in self.record_keys)

    def published_models(self, model) -> dict[str, Any]:
        """{subdirectory of final/ ('' for final/ itself): model} for the trained (unwrapped) module."""
        return self.final_models(model) if self.final_models is not None else {"": model}

    def check_options(self, cfg) -> None:
        """Refuse a config option this stage would not honour: silently ignoring it would train
        something other than what was asked for."""
        unsupported = [
            (cfg.packing and not self.packable, "packing true", "its rows cannot be packed; set packing false"),
            (cfg.pad_to != "longest" and not self.fixed_length, f"pad_to {cfg.pad_to}",
             "its collate does not pad to a fixed length; use pad_to longest"),
            (cfg.cross_entropy != "full" and not self.cross_entropy_variants, f"cross_entropy {cfg.cross_entropy}",
             "its loss does not compute the next-token cross-entropy through causal_lm_loss; use cross_entropy full"),
        ]
        for refused, option, why in unsupported:
            if refused:
                raise UserError(f"stage '{self.name}' does not honour --{option}: {why}")


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
        if (existing.config.__qualname__ != spec.config.__qualname__
                or source_file(existing.encode) != source_file(spec.encode)):
            raise UserError(f"two different stages are named '{spec.name}'")
    _STAGES[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


def source_file(fn) -> str | None:
    try:
        return str(Path(inspect.getsourcefile(fn)).resolve())
    except (TypeError, OSError):
        return getattr(fn, "__module__", None)


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


def discover(plugin_files: list[str] | None = None) -> None:
    """Find the entry-point stages once, then load any plugin files (environment first, then arguments).

    An entry point is loaded when its stage is first looked up (`get_stage`, `is_stage`), or with every
    other one when all are listed (`stages`, `all_names`): each built-in stage imports its own modules
    (reward models, generation, tools), seconds of start-up that a command using one stage never needs.
    """
    global _discovered
    if not _discovered:
        _discovered = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            _PENDING.setdefault(ep.name, []).append(ep)
    env = [p for p in os.environ.get(PLUGIN_ENV, "").split(os.pathsep) if p]
    for path in env + list(plugin_files or []):
        load_plugin_file(path)


# Entry points found by `discover` and not loaded yet, by entry-point name.
_PENDING: dict[str, list] = {}


def _load_entry_points(names: list[str] | None = None) -> None:
    """Load the pending entry points with these names (all of them when None) and register their stages."""
    for name in list(_PENDING) if names is None else [n for n in names if n in _PENDING]:
        for ep in _PENDING.pop(name):
            obj = ep.load()
            if isinstance(obj, StageSpec):
                register_stage(obj)


def _lookup(name: str) -> str | None:
    """The registered stage name for a stage name or alias: its entry point of that name is loaded first
    (so a clash with a plugin's stage of the same name is still found), then, if that does not settle it
    (an alias, or an entry point named otherwise than its stage), every other one."""
    _load_entry_points([name])
    if _ALIASES.get(name, name) not in _STAGES:
        _load_entry_points()
    name = _ALIASES.get(name, name)
    return name if name in _STAGES else None


def is_stage(name: str) -> bool:
    """Whether `name` is a registered stage or alias."""
    return _lookup(name) is not None


def get_stage(name: str) -> StageSpec:
    found = _lookup(name)
    if found is None:
        from minimind_scale.config import did_you_mean

        name = _ALIASES.get(name, name)
        raise UserError(f"unknown stage '{name}'{did_you_mean(name, all_names())}; "
                        f"stages: {', '.join(sorted(_STAGES))}")
    return _STAGES[found]


def stages() -> list[StageSpec]:
    _load_entry_points()
    return [_STAGES[k] for k in sorted(_STAGES)]


def all_names() -> list[str]:
    _load_entry_points()
    return sorted(_STAGES) + sorted(_ALIASES)
