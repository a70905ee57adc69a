"""The one training loop, for every stage, on HF Accelerate. Reads top to bottom in the order a run happens.

Loss normalisation (DESIGN §7): a stage returns loss SUMS and a unit count per micro-batch. Before an
optimizer step the engine counts the units of all its micro-batches on all ranks (N), then back-props
each micro-batch's sum scaled by world·accumulation/N. Accelerate (or DeepSpeed) divides by the
accumulation steps and DDP/ZeRO average over ranks, so the gradient is exactly Σ losses / N.
"""
from __future__ import annotations

import itertools
import json
import math
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

from .attention import resolve_attention
from .chunked_loss import enable_loss_forward
from .checkpoint import TrainState, find_resume_checkpoint, read_state, removed_on_write_failure, save_checkpoint
from .config import save_config
from .data import batches_per_epoch, make_loader, prepare_dataset, row_lengths, to_device
from .distributed import (LaunchEnv, check_launcher, check_tracker, load_deepspeed_config, make_accelerator,
                          resolve_precision, whole_model_construction)
from .errors import NonFiniteLoss, UserError
from .faults import NAN_AT_STEP, STEP_DELAY, StopRequest
from .flops import device_peak_flops, train_flops_per_token
from .losses import count_label_tokens
from .metrics import MetricsLog
from .models import build_model, check_model_source, count_parameters, load_tokenizer, save_hf


def build_optimizer(model, cfg):
    """AdamW; weight decay only on matrices (norm gains and biases are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if cfg.deepspeed and "offload_optimizer" in load_deepspeed_config(cfg.deepspeed).get("zero_optimization", {}):
        # ZeRO's optimizer offload steps on the CPU and accepts only DeepSpeed's CPU Adam (AdamW mode).
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2))


def build_scheduler(optimizer, cfg, total_steps: int):
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=cfg.warmup_steps,
                                                       num_training_steps=total_steps, min_lr_rate=cfg.min_lr_ratio)


def reduce_sum(accelerator, values: list[float | torch.Tensor]) -> list[float]:
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").tolist() if accelerator.num_processes > 1 else t.tolist()


def reset_peak_memory() -> None:
    """Start peak-memory accounting at the first step, so one-off set-up (a model built whole before
    ZeRO partitions it) does not hide what training itself needs."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
        except OSError:
            pass


def peak_memory_mb(accelerator) -> float:
    """The largest per-process peak over ranks since reset_peak_memory(): allocated CUDA memory, or
    resident memory (VmHWM) on a CPU."""
    if torch.cuda.is_available():
        mine = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource

        mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB; a lifetime peak
        try:
            status = Path("/proc/self/status").read_text()
            mine = int(status.split("VmHWM:")[1].split()[0]) / 1024
        except (OSError, IndexError, ValueError):
            pass
    t = torch.tensor([mine], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(t, reduction="max")) if accelerator.num_processes > 1 else mine


def optimizer_step_window(accelerator, model, optimizer, spec, cfg, ctx, window: list[dict],
                          inject_nan: bool = False) -> dict:
    """Forward/backward every micro-batch of one optimizer step; returns the step's global sums."""
    units = sum(float(spec.loss_units(b)) for b in window)
    tokens = sum(float(count_label_tokens(b)) for b in window if "labels" in b)
    inputs = sum(float(b["_tokens"]) for b in window if "_tokens" in b)
    total_units, total_tokens, total_inputs = reduce_sum(accelerator, [units, tokens, inputs])
    scale = accelerator.num_processes * cfg.accumulation_steps / max(total_units, 1.0)
    # A short window (the end of an epoch) must still sync on its last micro-batch: accelerate's
    # accumulate() syncs when its counter reaches the accumulation steps.
    accelerator.step = cfg.accumulation_steps - len(window)
    loss_sum, metric_sums = 0.0, {}
    for batch in window:
        batch = to_device(batch, accelerator.device)
        with accelerator.accumulate(model):
            out = spec.loss(model, batch, cfg, ctx)
            if inject_nan:
                out.loss_sum = out.loss_sum * float("nan")
            accelerator.backward(out.loss_sum * scale)
        loss_sum += out.loss_sum.detach().float()
        for k, v in out.metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + v.detach().float()
    names = sorted(metric_sums)
    reduced = reduce_sum(accelerator, [loss_sum] + [metric_sums[k] for k in names])
    loss = reduced[0] / max(total_units, 1.0)
    metrics = {k: v / max(total_units, 1.0) for k, v in zip(names, reduced[1:])}
    row_length = max((b["input_ids"].shape[1] for b in window if "input_ids" in b), default=0)
    return {"loss": loss, "tokens": int(total_tokens), "units": total_units, "input_tokens": int(total_inputs),
            "row_length": int(row_length), **metrics}


def clip_gradients(accelerator, model, cfg) -> float | None:
    """The gradient norm before clipping (None where DeepSpeed does not report one, as under ZeRO-0).
    DeepSpeed already clipped and stepped inside backward."""
    if accelerator.distributed_type.name == "DEEPSPEED":
        norm = model.get_global_grad_norm()
    else:
        norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    return float(norm) if norm is not None else None


def train(spec, cfg) -> Path:
    env = LaunchEnv.from_environ()
    check_launcher(env)
    out_dir = Path(cfg.out_dir)
    say = print if env.is_main else (lambda *a, **k: None)
    # Everything a typo could break is checked before the (possibly long) tokenisation.
    check_model_source(cfg.model, cfg.hidden_size, cfg.num_hidden_layers)
    check_tracker(cfg.report_to)
    attention = resolve_attention(cfg.attn_implementation, resolve_precision(cfg.dtype))
    if cfg.deepspeed:
        load_deepspeed_config(cfg.deepspeed)
        if cfg.nan_policy == "skip_step":
            raise UserError("nan_policy skip_step cannot be used with --deepspeed: DeepSpeed applies the update "
                            "inside backward, before the loss can be checked. Use nan_policy stop.")
    checkpoint = find_resume_checkpoint(cfg.resume, out_dir)
    written_by = read_state(checkpoint).world_size if checkpoint is not None else env.world_size
    if written_by != env.world_size:
        raise UserError(f"{checkpoint} was written by {written_by} process(es) and this run "
                        f"has {env.world_size}: the data order depends on the process count, so resume with the "
                        "same count, or start a new out_dir with --model set to a final/ model directory.")
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
    # Tokenise before any process group exists: other local ranks wait on the file system, so a
    # long first tokenisation can never hit a collective timeout.
    dataset, _, report = prepare_dataset(spec, cfg, tokenizer, is_local_main=env.is_local_main, log=say)

    accelerator = make_accelerator(cfg, tracker_dir=str(out_dir))
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    ctx = SimpleNamespace(tokenizer=tokenizer, accelerator=accelerator, out_dir=out_dir, dataset=dataset)
    with whole_model_construction(accelerator):
        model = build_model(cfg.model, tokenizer, cfg.hidden_size, cfg.num_hidden_layers)
        model.set_attn_implementation(attention)
        if spec.setup is not None:
            model = spec.setup(model, cfg, ctx)
    if cfg.cross_entropy != "full":  # before prepare: Accelerate's autocast wraps the forward it finds
        enable_loss_forward(model, cfg.cross_entropy)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    n_params, n_trainable = count_parameters(model)

    world = accelerator.num_processes
    per_epoch = math.ceil(batches_per_epoch(len(dataset), world, cfg.batch_size) / cfg.accumulation_steps)
    total_steps = cfg.max_steps or per_epoch * cfg.epochs
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    if accelerator.state.deepspeed_plugin is not None:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.compile:
        model = torch.compile(model)
    accelerator.register_for_checkpointing(scheduler)

    state = TrainState(world_size=world)
    if checkpoint is not None:
        state = read_state(checkpoint)
        accelerator.load_state(str(checkpoint))
        say(f"resumed from {checkpoint} at step {state.step}")
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        # What the run trained on: records kept, skipped per reason, tokens (also beside the cache).
        (out_dir / "data_report.json").write_text(json.dumps(report.__dict__, indent=1))
    if cfg.report_to != "none":
        # Trackers' hyper-parameter tables take scalars only; lists and None are written as text.
        flat = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in cfg.model_dump(mode="json").items()}
        accelerator.init_trackers(out_dir.name, config=flat)
    metrics_log = MetricsLog(out_dir, accelerator, state.step)

    precision = accelerator.mixed_precision if accelerator.mixed_precision != "no" else "fp32"
    peak_flops = device_peak_flops(precision, cfg.peak_tflops)
    model_config = getattr(accelerator.unwrap_model(model), "config", None)
    flops_per_token = (lambda row_length: train_flops_per_token(model_config, row_length, n_trainable / n_params)) \
        if model_config is not None else (lambda row_length: 0.0)
    say(f"[{spec.name}] model {n_params / 1e6:.2f}M params ({n_trainable / 1e6:.2f}M trainable) | "
        f"data {report.summary()} | {total_steps} steps of {cfg.batch_size}x{cfg.accumulation_steps}x{world} rows | "
        f"{precision}, {attention} attention | {accelerator.distributed_type.name.lower()} x{world} on {accelerator.device}")

    collate = lambda rows: spec.collate(rows, tokenizer, cfg)  # noqa: E731
    lengths = row_lengths(dataset) if cfg.group_by_length else None
    bar = tqdm(total=total_steps, initial=state.step, desc=spec.name, disable=not accelerator.is_main_process,
               dynamic_ncols=True, file=sys.stdout)
    model.train()
    stop = StopRequest()
    deepspeed = accelerator.distributed_type.name == "DEEPSPEED"
    reset_peak_memory()
    started, last_log_time, tokens_at_last_log = time.time(), time.time(), state.tokens
    inputs_since_log, flops_since_log = 0, 0.0
    while state.step < total_steps:
        loader = make_loader(dataset, collate, cfg.batch_size, world, accelerator.process_index, cfg.seed,
                             state.epoch, skip_batches=state.batch_in_epoch, num_workers=cfg.dataloader_workers,
                             lengths=lengths)
        batches = iter(loader)
        while state.step < total_steps:
            window = list(itertools.islice(batches, cfg.accumulation_steps))
            if not window:
                break
            result = optimizer_step_window(accelerator, model, optimizer, spec, cfg, ctx, window,
                                           inject_nan=state.step + 1 == NAN_AT_STEP)
            lr = scheduler.get_last_lr()[0]
            grad_norm = clip_gradients(accelerator, model, cfg)
            if math.isfinite(result["loss"]) and (grad_norm is None or math.isfinite(grad_norm)):
                if not deepspeed:
                    optimizer.step()
            elif cfg.nan_policy == "stop" or deepspeed:
                raise NonFiniteLoss(f"step {state.step + 1}: loss {result['loss']}, gradient norm {grad_norm}. Stopped "
                                    "without saving: the newest checkpoint in checkpoints/ is the last good state "
                                    "(nan_policy skip_step would skip such steps instead).")
            else:
                state.skipped_steps += 1
                say(f"\nstep {state.step + 1}: non-finite loss or gradient, update skipped ({state.skipped_steps} so far)")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state.step += 1
            state.batch_in_epoch += len(window)
            state.tokens += result.pop("tokens")
            result.pop("units")
            step_inputs = result.pop("input_tokens")
            inputs_since_log += step_inputs
            flops_since_log += step_inputs * flops_per_token(result.pop("row_length"))
            if state.step % cfg.log_interval == 0 or state.step == total_steps:
                now = time.time()
                span = max(now - last_log_time, 1e-9)
                row = {"step": state.step, "epoch": state.epoch + state.batch_in_epoch / max(1, per_epoch * cfg.accumulation_steps),
                       "lr": lr, "grad_norm": grad_norm, "tokens": state.tokens,
                       "tokens_per_sec": (state.tokens - tokens_at_last_log) / span,
                       "input_tokens_per_sec": inputs_since_log / span,
                       "elapsed_sec": state.elapsed_sec + now - started, "world_size": world,
                       "peak_mem_mb": peak_memory_mb(accelerator), "skipped_steps": state.skipped_steps, **result}
                if peak_flops:
                    row["mfu"] = flops_since_log / span / (peak_flops * world)
                metrics_log.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_sec']:.0f}")
                last_log_time, tokens_at_last_log, inputs_since_log, flops_since_log = now, state.tokens, 0, 0.0
            bar.update(1)
            if STEP_DELAY:
                time.sleep(STEP_DELAY)
            stopping = stop.agreed(accelerator)
            if stopping or (cfg.save_interval and state.step % cfg.save_interval == 0 and state.step < total_steps):
                state.elapsed_sec += time.time() - started
                started = time.time()
                saved = save_checkpoint(accelerator, out_dir, state, cfg.save_total_limit)
            if stopping:
                bar.close()
                say(f"stopped by {stop.signal_name or 'a signal on another rank'} after step {state.step}; "
                    f"checkpoint {saved}. Run the same command again to continue.")
                accelerator.end_training()
                return saved
        if state.step < total_steps:
            state.epoch += 1
            state.batch_in_epoch = 0
    bar.close()
    state.elapsed_sec += time.time() - started
    save_checkpoint(accelerator, out_dir, state, cfg.save_total_limit)
    final = save_final(accelerator, model, tokenizer, out_dir, spec, cfg, ctx)
    accelerator.end_training()
    say(f"done: {state.step} steps, {state.tokens} loss-bearing tokens, {state.elapsed_sec:.1f}s -> {final}")
    return final


def save_final(accelerator, model, tokenizer, out_dir: Path, spec, cfg, ctx) -> Path:
    """final/ is written under a temporary name and renamed, like a checkpoint: it is complete or absent."""
    final, partial = out_dir / "final", out_dir / ".tmp-final"
    # Under DeepSpeed every rank must join the gather of sharded weights; otherwise the model's own
    # state dict (with its tied embedding) is what save_pretrained expects.
    state_dict = accelerator.get_state_dict(model) if accelerator.state.deepspeed_plugin is not None else None
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        with removed_on_write_failure(partial, out_dir):
            save_hf(accelerator.unwrap_model(model), tokenizer, partial, state_dict=state_dict)
            if spec.finalize is not None:
                spec.finalize(accelerator.unwrap_model(model), tokenizer, partial, cfg, ctx)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    accelerator.wait_for_everyone()
    return final
