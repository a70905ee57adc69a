"""Pydantic configs, YAML + command-line merging, and readable validation errors.

Precedence: a config class's defaults < the YAML file given with `--config` < `--field value` flags.
Every problem found is reported at once, each naming where the bad value came from.
"""
from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from minimind_scale.errors import UserError


class StrictConfig(BaseModel):
    """Base of every config: unknown keys are refused (a typo must never train the wrong model)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# Fields whose defaults stages change. A stage config re-annotates one with a new default only
# (`learning_rate: LearningRate = 1e-5`) and keeps its constraints and description.
OutDir = Annotated[str, Field(description="where config.yaml, metrics.jsonl, checkpoints/ and final/ go")]
ModelSource = Annotated[str, Field(description="a preset name or a Hugging Face model directory to start from")]
MaxSeqLen = Annotated[int, Field(ge=8, description="tokens per sample; longer samples keep their prefix")]
Epochs = Annotated[int, Field(ge=1, description="passes over the data (ignored when max_steps is set)")]
BatchSize = Annotated[int, Field(ge=1, description="samples per micro-batch per process")]
AccumulationSteps = Annotated[int, Field(ge=1, description="micro-batches per optimizer step")]
LearningRate = Annotated[float, Field(gt=0, description="peak learning rate")]
Packing = Annotated[bool, Field(description="pack several samples into each max_seq_len row (best-fit decreasing); "
                                "attention never crosses samples, so the loss is that of unpacked rows")]


class TrainConfig(StrictConfig):
    """Fields common to every training stage. A stage subclasses this and may change defaults."""

    data_path: list[str] = Field(default_factory=list, description="one or more jsonl data files")
    out_dir: OutDir = "out/run"
    model: ModelSource = "minimind2-small"
    hidden_size: int | None = Field(None, ge=8, description="override the preset's hidden size (from scratch only)")
    num_hidden_layers: int | None = Field(None, ge=1,
                                          description="override the preset's layer count (from scratch only)")
    tokenizer: str | None = Field(None, description="tokenizer directory; default: the model's, else the one shipped "
                                  "with the package")
    max_seq_len: MaxSeqLen = 512
    epochs: Epochs = 1
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: BatchSize = 8
    accumulation_steps: AccumulationSteps = 1
    learning_rate: LearningRate = 5e-4
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of learning_rate")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    adam_beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1")
    adam_beta2: float = Field(0.95, gt=0, lt=1, description="AdamW beta2")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm (0 disables clipping)")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="mixed precision: auto = bf16 where supported, else fp32")
    seed: int = Field(42, description="seed for weights, shuffling, dropout and per-record data augmentations")
    log_interval: int = Field(10, ge=1, description="log every N optimizer steps")
    save_interval: int = Field(500, ge=0, description="checkpoint every N optimizer steps (0: only at the end)")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept; older ones are deleted")
    resume: str = Field("auto", description="auto (newest complete checkpoint in out_dir), never, or a checkpoint path")
    packing: Packing = False
    num_proc: int = Field(default_factory=lambda: max(1, min(8, os.cpu_count() or 1)), ge=1,
                          description="tokenisation worker processes")
    cache_dir: str | None = Field(None, description="tokenised-data cache (default $MINIMIND_SCALE_CACHE or "
                                  "~/.cache/minimind_scale)")
    skip_bad_records: bool = Field(False, description="skip malformed records (counted in the log) instead of failing")
    report_to: Literal["none", "tensorboard", "wandb", "swanlab"] = Field("none", description="experiment tracker")
    deepspeed: str | None = Field(None, description="DeepSpeed JSON config (ds_configs/zeroN.json)")
    nan_policy: Literal["stop", "skip_step"] = Field("stop", description="on a non-finite loss or gradient: stop "
                                                     "(keeping the last checkpoint) or skip that update")
    collective_timeout_sec: int = Field(600, ge=10, description="how long a process waits in a collective for the "
                                        "others; a rank that died makes the rest stop after at most this long")
    group_by_length: bool = Field(False, description="padded batches (packing false, DPO): batch samples of similar "
                                  "length together, in shuffled groups, so less of each batch is padding")
    pad_to: Literal["longest", "max_seq_len"] = Field(
        "longest", description="padded batches: pad to the batch's longest row, or to max_seq_len as MiniMind does "
                               "(for comparisons)")
    cross_entropy: Literal["full", "chunked", "liger"] = Field(
        "full", description="next-token loss: full logits; chunked (the [tokens x vocab] fp32 logits are never held "
                            "at once); liger (fused kernel, where liger-kernel is installed)")
    peak_tflops: float | None = Field(None, gt=0, description="one device's peak TFLOP/s at the run's precision, for "
                                         "the mfu metric (default: a table of common GPUs; none on CPUs)")
    dataloader_workers: int = Field(0, ge=0,
                                    description="data loader worker processes (0: load in the training process)")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"] = Field(
        "auto", description="attention kernel: auto = flash_attention_2 on CUDA in bf16/fp16 where flash-attn is "
                            "installed, else sdpa. Packed rows never attend across samples with any of them")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    compile: bool = Field(False, description="torch.compile the model")
    plugin: list[str] = Field(default_factory=list, description="stage plugin files to load before the stage is "
                              "looked up (with --config, the file's list is loaded too; also $MINIMIND_SCALE_PLUGINS)")
    # What the run trains on (data/selection.py) and how it is watched (training/evaluation.py).
    max_samples: list[int] = Field(default_factory=list, description="cap each data file at this many records, "
                                   "a seeded random subset (one value for every file, or one per file)")
    data_weights: list[float] = Field(default_factory=list, description="one weight per data file: an epoch draws "
                                      "as many records as the files hold, file i giving its share, over-sampling a "
                                      "file that runs out (weights count records, not tokens)")
    val_size: float | None = Field(None, gt=0, allow_inf_nan=False,
                                   description="hold out this share (< 1) or count (>= 1) of the training records "
                                   "as the evaluation set 'val', from every file in proportion")
    eval_data_path: list[str] = Field(default_factory=list, description="evaluation sets, each [NAME=]FILE (name "
                                      "default: the file's stem), in the stage's format or {\"text\"} for a "
                                      "causal-LM stage")
    eval_interval: int | None = Field(None, ge=1, description="evaluate every N optimizer steps (default: at every "
                                      "checkpoint and at the end)")
    eval_batch_size: int | None = Field(None, ge=1, description="rows per evaluation batch (default: batch_size)")
    save_best_metric: str | None = Field(None, description="keep out_dir/best/ for the best value of this "
                                         "evaluation metric, e.g. eval/val/loss")
    save_best_mode: Literal["auto", "min", "max"] = Field(
        "auto", description="auto = min for metrics ending in loss, ppl or kl, else max")
    early_stopping_patience: int | None = Field(None, ge=1, description="stop after this many evaluations without "
                                                "an improvement of the monitored metric (save_best_metric, default "
                                                "the first evaluation set's loss, or reward)")
    early_stopping_threshold: float = Field(0.0, ge=0, description="the least change that counts as an improvement")

    @model_validator(mode="after")
    def _data_mixture_matches_files(self):
        problems = [p for p in (self._weights_problem(), self._caps_problem(), self._held_out_problem()) if p]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _weights_problem(self) -> str | None:
        n, weights = len(self.data_path), self.data_weights
        if not weights:
            return None
        if len(weights) != n:
            return f"data_weights has {len(weights)} values for {n} data file(s) (give one weight per --data_path file)"
        if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(w > 0 for w in weights):
            return f"data_weights must be finite and >= 0 with at least one > 0, got {weights}"
        return None

    def _caps_problem(self) -> str | None:
        n, caps = len(self.data_path), self.max_samples
        if caps and len(caps) not in (1, n):
            return f"max_samples has {len(caps)} values for {n} data file(s) (give one for every file, or one per file)"
        if any(c < 1 for c in caps):
            return f"max_samples must be >= 1, got {caps}"
        return None

    def _held_out_problem(self) -> str | None:
        if self.val_size is not None and self.val_size >= 1 and not float(self.val_size).is_integer():
            return f"val_size {self.val_size:g}: a count (>= 1) is a whole number of records; a share is < 1"
        for option in ("early_stopping_patience", "save_best_metric"):
            if getattr(self, option) is not None and not (self.eval_data_path or self.val_size):
                return f"{option} needs an evaluation set: give --val_size or --eval_data_path"
        return None


# --------------------------------------------------------------------------- parsing


def _read_config_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the config file ({e.strerror or e})") from None


def _yaml_key_lines(text: str) -> dict[str, int]:
    """Line number (1-based) of each top-level key in a YAML mapping, for error messages."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    # Keys are matched by their text; a non-string key (`1: x`) simply gets no line number.
    return {k.value: k.start_mark.line + 1 for k, _ in reversed(node.value) if isinstance(k, yaml.ScalarNode)}


def _load_yaml_text(text: str, path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a mapping of field: value, got {type(data).__name__}")
    return data


def load_yaml(path: str) -> dict[str, Any]:
    return _load_yaml_text(_read_config_text(path), path)


def _is_list_field(annotation: Any) -> bool:
    if get_origin(annotation) is list:
        return True
    return any(get_origin(a) is list for a in get_args(annotation))


def _is_optional(annotation: Any) -> bool:
    return type(None) in get_args(annotation)


def parse_flags(argv: list[str], cls: type[BaseModel]) -> dict[str, Any]:
    """`--field value`, `--field=value`, `-`/`_` alike; list fields take every value up to the next flag.

    A bare boolean flag means true. Names that are not fields are kept (with their values, if any)
    so that `build_config` can report them together with every other problem, with a did-you-mean.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--":
            raise UserError(f"unexpected argument {tok!r}: options look like --field value")
        name, eq, inline = tok[2:].partition("=")
        name = name.replace("-", "_")
        if not name:
            raise UserError(f"unexpected argument {tok!r}: options look like --field value")
        values: list[str] = [inline] if eq else []
        i += 1
        if not eq:
            while i < len(argv) and not (argv[i].startswith("--") and len(argv[i]) > 2):
                values.append(argv[i])
                i += 1
        field = cls.model_fields.get(name)
        if field is None:
            # Reported by build_config as an unknown field (with a did-you-mean).
            out[name] = values[0] if len(values) == 1 else values
        elif _is_list_field(field.annotation):
            if not values:
                raise UserError(f"--{name} needs at least one value")
            out[name] = values
        elif not values:
            # a bare boolean flag means true, as users expect from --packing
            if field.annotation is not bool:
                raise UserError(f"--{name} needs a value")
            out[name] = "true"
        elif len(values) > 1:
            raise UserError(f"--{name} takes one value, got {len(values)}: {' '.join(values)}")
        else:
            out[name] = values[0]
    return out


def did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def build_config(cls: type[BaseModel], flags: dict[str, Any], yaml_path: str | None = None) -> BaseModel:
    """Merge YAML then flags over the class defaults; raise one UserError listing every problem."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if yaml_path:
        text = _read_config_text(yaml_path)
        data = _load_yaml_text(text, yaml_path)
        lines = _yaml_key_lines(text)
        for k, v in data.items():
            values[k] = v
            origin[k] = f"{yaml_path}:{lines[k]}" if isinstance(k, str) and k in lines else yaml_path
    for k, v in flags.items():
        values[k] = v
        origin[k] = "command line"
    problems = []
    known: dict[str, Any] = {}
    for k, v in values.items():
        f = cls.model_fields.get(k) if isinstance(k, str) else None
        if f is None:
            problems.append(f"{origin[k]}: unknown field '{k}'{did_you_mean(str(k), cls.model_fields)}")
            continue
        # Strings from the command line (or a scalar in YAML) become lists for list fields.
        if _is_list_field(f.annotation) and isinstance(v, str):
            v = [v]
        # `--max_steps none` unsets an optional field that a YAML file set.
        if _is_optional(f.annotation) and isinstance(v, str) and v.strip().lower() in ("none", "null"):
            v = None
        known[k] = v
    try:
        cfg = cls(**known)
    except ValidationError as e:
        for err in e.errors():
            if not err["loc"]:  # a rule across fields (a model validator): its message names them
                problems.append(str(err["msg"]).removeprefix("Value error, "))
                continue
            key = str(err["loc"][0])
            loc = ".".join(str(x) for x in err["loc"])
            got = known.get(key, "<missing>")
            problems.append(f"{origin.get(key, 'config')}: field '{loc}': {err['msg']} (got {got!r})")
        raise UserError("\n".join(problems)) from None
    if problems:
        raise UserError("\n".join(problems))
    return cfg


def _type_name(ann) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin is list:
        return f"{_type_name(args[0])} ..."
    if args and type(None) in args:  # Optional[X]
        return _type_name(next(a for a in args if a is not type(None)))
    return getattr(ann, "__name__", str(ann))


def describe_fields(cls: type[BaseModel]) -> str:
    """One line per field: name, type, default and meaning, for `STAGE --help`."""
    rows = []
    for name, f in cls.model_fields.items():
        type_name = _type_name(f.annotation)
        default = "required" if f.is_required() else (f.default_factory() if f.default_factory is not None
                                                      else f.default)
        rows.append((f"--{name}", type_name, default if f.is_required() else repr(default), f.description or ""))
    w0 = max(len(r[0]) for r in rows)
    w1 = min(28, max(len(r[1]) for r in rows))
    return "\n".join(f"  {a:<{w0}}  {b:<{w1}}  default {c:<14} {d}" for a, b, c, d in rows)


def save_config(cfg: BaseModel, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True))
