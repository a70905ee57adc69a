"""Setting up one training run: everything the loop needs, checked, built and prepared, as one typed object.

The order matters and is the reason this is one function: whatever a typo could break is checked before
the (possibly long) tokenisation; tokenisation happens before any process group exists (other local ranks
wait on the file system, so a long first tokenisation can never hit a collective timeout); models are
built whole before Accelerate/DeepSpeed prepare them; a checkpoint is loaded only after prepare.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minimind_scale.config import TrainConfig, save_config
from minimind_scale.data.prepare import DataReport, prepare_dataset
from minimind_scale.data.selection import select
from minimind_scale.data.training_rows import TrainingRows
from minimind_scale.errors import UserError
from minimind_scale.losses.chunked import enable_loss_forward
from minimind_scale.models.attention import resolve_attention
from minimind_scale.models.build import build_model, check_model_source, count_parameters, load_tokenizer
from minimind_scale.training.callbacks import Callback, registered_callbacks
from minimind_scale.training.checkpoint import TrainState, find_resume_checkpoint, load_checkpoint, read_state
from minimind_scale.training.context import StageContext
from minimind_scale.training.distributed import (
    LaunchEnv,
    check_launcher,
    check_tracker,
    load_deepspeed_config,
    make_accelerator,
    resolve_precision,
    whole_model_construction,
)
from minimind_scale.training.held_out import check_held_out, prepare_held_out, write_held_out_records
from minimind_scale.training.metrics import MetricsLog
from minimind_scale.training.optimization import build_optimizer, build_scheduler
from minimind_scale.training.out_dir import check_out_dir, hold_out_dir
from minimind_scale.training.registry import StageSpec
from minimind_scale.training.telemetry import Throughput


@dataclass
class Run:
    """One training run, set up: what `engine.train` and the callbacks see."""

    spec: StageSpec
    cfg: TrainConfig
    accelerator: Any
    model: Any             # prepared (DDP / DeepSpeed engine, maybe compiled)
    optimizer: Any
    scheduler: Any
    ctx: StageContext      # tokenizer, dataset and the stage's own state
    state: TrainState      # the loop's position, restored on resume
    metrics_log: MetricsLog
    throughput: Throughput
    total_steps: int
    data: TrainingRows     # the rows of each epoch (caps, val split, weights, packing)
    steps_per_rollout: int
    callbacks: list[Callback]
    say: Callable[[str], None]

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def uses_deepspeed(self) -> bool:
        return self.accelerator.distributed_type.name == "DEEPSPEED"


def check_before_loading(spec: StageSpec, cfg: TrainConfig, env: LaunchEnv) -> tuple[str, Path | None]:
    """Every check that needs no data and no model: (attention kernel, checkpoint to resume from)."""
    check_launcher(env)
    spec.check_options(cfg)
    if spec.check is not None:
        spec.check(cfg)
    check_model_source(cfg.model, cfg.hidden_size, cfg.num_hidden_layers)
    check_tracker(cfg.report_to)
    check_held_out(spec, cfg)
    attention = resolve_attention(cfg.attn_implementation, resolve_precision(cfg.dtype))
    if cfg.deepspeed:
        load_deepspeed_config(cfg.deepspeed)
        if cfg.nan_policy == "skip_step":
            raise UserError("nan_policy skip_step cannot be used with --deepspeed: DeepSpeed applies the update "
                            "inside backward, before the loss can be checked. Use nan_policy stop.")
    check_out_dir(cfg.out_dir)
    checkpoint = find_resume_checkpoint(cfg.resume, Path(cfg.out_dir), spec.name)
    written_by = read_state(checkpoint).world_size if checkpoint is not None else env.world_size
    if written_by != env.world_size:
        raise UserError(f"{checkpoint} was written by {written_by} process(es) and this run "
                        f"has {env.world_size}: the data order depends on the process count, so resume with the "
                        "same count, or start a new out_dir with --model set to a final/ model directory.")
    return attention, checkpoint


def build_training_model(spec: StageSpec, cfg: TrainConfig, ctx: StageContext, attention: str):
    """The model to train, whole (never under ZeRO-3's zero.Init), with the stage's set-up applied."""
    with whole_model_construction(ctx.accelerator):
        if spec.build_model is not None:
            model = spec.build_model(cfg, ctx.tokenizer)
        else:
            model = build_model(cfg.model, ctx.tokenizer, cfg.hidden_size, cfg.num_hidden_layers)
        model.set_attn_implementation(attention)
        if spec.setup is not None:
            model = spec.setup(model, cfg, ctx)
    if cfg.cross_entropy != "full":  # before prepare: Accelerate's autocast wraps the forward it finds
        enable_loss_forward(model, cfg.cross_entropy)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def write_run_files(cfg: TrainConfig, report: DataReport, data: TrainingRows, accelerator) -> None:
    """config.yaml (re-runnable with --config), data_report.json, val.jsonl (the held-out records, as
    written), and the tracker's hyper-parameters."""
    out_dir = Path(cfg.out_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        # What the run trained on: records kept, skipped per reason, too long, tokens; what each file gave.
        (out_dir / "data_report.json").write_text(json.dumps({**report.__dict__,
                                                              "sources": data.sources(cfg.data_path)}, indent=1))
        if len(data.selection.val):
            write_held_out_records(data.unpacked_dir, data.selection.val, cfg.data_path, out_dir / "val.jsonl")
    if cfg.report_to != "none":
        # Trackers' hyper-parameter tables take scalars only; lists and None are written as text.
        flat = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
                for k, v in cfg.model_dump(mode="json").items()}
        accelerator.init_trackers(out_dir.name, config=flat)


def prepare_data(spec: StageSpec, cfg: TrainConfig, tokenizer, is_local_main: bool,
                 say) -> tuple[TrainingRows, DataReport, dict]:
    """The training rows of every epoch, what tokenising found, and the held-out sets, all before any
    process group exists (see the module docstring). The training files are tokenised once, unpacked;
    each epoch's rows are then selected (and packed) from them."""
    dataset, unpacked_dir, report = prepare_dataset(spec, cfg.model_copy(update={"packing": False}), tokenizer,
                                                    is_local_main=is_local_main, log=say)
    selection = select(report.file_records, cfg, cfg.data_path)
    data = TrainingRows(spec, cfg, dataset, unpacked_dir, selection, is_local_main, say)
    eval_sets = prepare_held_out(spec, cfg, tokenizer, dataset, unpacked_dir, selection.val, is_local_main, say)
    if len(cfg.data_path) > 1 or not selection.is_everything:
        for source in data.sources(cfg.data_path):
            say(f"  {source['file']}: {source['train_records']} records ({source['tokens']:,} tokens) to train on, "
                f"{source['records_per_epoch']} per epoch" + (f" at weight {source['weight']:.3f}"
                                                              if source["weight"] is not None else "")
                + (f", {source['val_records']} held out as val" if source["val_records"] else ""))
    for name, rows in eval_sets.items():
        say(f"  evaluation set '{name}': {len(rows)} records")
    return data, report, eval_sets


def check_same_data(checkpoint: Path, data_identity: str) -> None:
    """Refuse to resume a checkpoint trained on another data selection (checked before any model is built)."""
    saved = read_state(checkpoint).data_identity
    if saved and saved != data_identity:
        raise UserError(f"{checkpoint} was trained on another selection of the data (other --data_path, "
                        "--max_samples, --val_size, --data_weights or --seed): resuming would not continue it. "
                        "Use the same options, or a new out_dir.")


def setup(spec: StageSpec, cfg: TrainConfig) -> Run:
    env = LaunchEnv.from_environ()
    say = print if env.is_main else (lambda *a, **k: None)
    attention, checkpoint = check_before_loading(spec, cfg, env)
    # Before tokenising, so that a second run into this out_dir stops at once; released at exit at the latest.
    lock = hold_out_dir(cfg.out_dir, say) if env.is_main else None
    try:
        tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
        data, report, eval_sets = prepare_data(spec, cfg, tokenizer, env.is_local_main, say)
        if checkpoint is not None:
            check_same_data(checkpoint, data.selection.identity())
    except BaseException:
        if lock is not None:  # refused before writing anything: out_dir is left as the run found it
            lock.release()
        raise

    accelerator = make_accelerator(cfg, tracker_dir=cfg.out_dir)
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    world = accelerator.num_processes
    ctx = StageContext(tokenizer=tokenizer, accelerator=accelerator, out_dir=Path(cfg.out_dir),
                       dataset=data.for_epoch(0)[0], state=spec.state(), eval_sets=eval_sets)
    model = build_training_model(spec, cfg, ctx, attention)
    n_params, n_trainable = count_parameters(model)
    reuse = spec.steps_per_rollout(cfg) if spec.steps_per_rollout is not None else 1
    total_steps = cfg.max_steps or data.total_steps(world) * reuse
    optimizer = build_optimizer(model, cfg, spec.learning_rates(cfg) if spec.learning_rates is not None else None)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    if accelerator.state.deepspeed_plugin is not None:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.compile:
        model = torch.compile(model)
    accelerator.register_for_checkpointing(scheduler)
    state = TrainState(world_size=world, stage=spec.name, data_identity=data.selection.identity())
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, ctx.state)
        say(f"resumed from {checkpoint} at step {state.step}")
    write_run_files(cfg, report, data, accelerator)
    throughput = Throughput(accelerator, model, n_params, n_trainable, cfg.peak_tflops, state.tokens)
    say(f"[{spec.name}] model {n_params / 1e6:.2f}M params ({n_trainable / 1e6:.2f}M trainable) | "
        f"data {report.summary()} | {total_steps} steps of {cfg.batch_size}x{cfg.accumulation_steps}x{world} rows | "
        f"{throughput.precision}, {attention} attention | "
        f"{accelerator.distributed_type.name.lower()} x{world} on {accelerator.device}")
    return Run(spec=spec, cfg=cfg, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
               ctx=ctx, state=state, metrics_log=MetricsLog(Path(cfg.out_dir), accelerator, state.step),
               throughput=throughput, total_steps=total_steps, data=data, steps_per_rollout=reuse,
               callbacks=registered_callbacks(), say=say)
