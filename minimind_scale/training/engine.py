"""The one training loop, for every stage, on HF Accelerate. Reads top to bottom in the order a step happens.

Loss normalisation (docs/architecture.md): a stage returns loss SUMS and a unit count per micro-batch.
Before an optimizer step the engine counts the units of all its micro-batches on all ranks (N), then
back-props each micro-batch's sum scaled by world·accumulation/N. Accelerate (or DeepSpeed) divides by
the accumulation steps and DDP/ZeRO average over ranks, so the gradient is exactly Σ losses / N.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minimind_scale.data.batching import to_device
from minimind_scale.data.loader import make_loader
from minimind_scale.data.rows import row_lengths
from minimind_scale.errors import NonFiniteLoss
from minimind_scale.training import evaluation
from minimind_scale.training.batch import MicroBatch, counted, row_length
from minimind_scale.training.checkpoint import save_checkpoint
from minimind_scale.training.context import Rollout
from minimind_scale.training.distributed import reduce_sum
from minimind_scale.training.held_out import BEST_FILE, best_mode
from minimind_scale.training.model_dirs import gathered_parameters, save_model_dir
from minimind_scale.training.preemption import StopRequest
from minimind_scale.training.run import Run, setup


@dataclass
class StepResult:
    """One optimizer step, summed over its micro-batches and all ranks."""

    loss: float                  # Σ loss / Σ units
    metrics: dict[str, float]    # the stage's metrics, each Σ / Σ units
    tokens: int                  # loss-bearing tokens
    input_tokens: int            # all real tokens, for throughput and MFU
    row_length: int              # the longest row, for FLOPs per token
    lr: float = 0.0              # the learning rate the update used
    grad_norm: float | None = None  # before clipping; None where DeepSpeed reports none (ZeRO-0)


def train(spec, cfg) -> Path:
    run = setup(spec, cfg)
    state = run.state
    stop = StopRequest()
    bar = tqdm(total=run.total_steps, initial=state.step, desc=spec.name, file=sys.stdout, dynamic_ncols=True,
               disable=not run.accelerator.is_main_process)
    run.model.train()
    run.throughput.start()
    early_stop = evaluation.stopped_early(run)  # a resumed run that had already run out of patience
    while state.step < run.total_steps and early_stop is None:
        for step in step_batches(run):
            # Kept on the step: the seam reads it to decide whether a rollout is reused further.
            step.result = optimizer_step(run, step) if step.micro_batches else skip_update(run)
            state.step += 1
            state.batch_in_epoch += step.consumed
            if step.result is not None:
                record_step(run, step.result, bar)
            bar.update(1)
            stopping = step.ends_rollout and stop.agreed(run.accelerator)
            # A rollout's steps are saved together: due when its steps crossed a multiple of save_interval.
            every = cfg.save_interval
            save_due = (every and state.step < run.total_steps and step.ends_rollout
                        and state.step // every != (state.step - run.steps_per_rollout) // every)
            if evaluation.due(run, state.step, save_due, step.ends_rollout):
                early_stop = watch(run)  # before the checkpoint, which then holds the evaluation's state
                if early_stop is not None:
                    break
            if stopping or save_due:
                saved = checkpoint(run)
            if stopping:
                bar.close()
                run.say(f"stopped by {stop.signal_name or 'a signal on another rank'} after step {state.step}; "
                        f"checkpoint {saved}. Run the same command again to continue.")
                run.accelerator.end_training()
                return saved
            if state.step == run.total_steps:
                break
        else:  # the epoch ran out before the last step
            state.epoch += 1
            state.batch_in_epoch = 0
    bar.close()
    if early_stop is not None:
        run.say(early_stop)
    checkpoint(run)
    final = save_final(run)
    run.accelerator.end_training()
    run.say(f"done: {state.step} steps, {state.tokens} loss-bearing tokens, {state.elapsed_sec:.1f}s -> {final}")
    return final


def watch(run: Run) -> str | None:
    """Measure the held-out sets, keep best/ when the monitored metric improved; why to stop early, if so."""
    verdict, results = evaluation.evaluate_and_track(run)
    if verdict.improved:
        save_best(run, evaluation.monitored_metric(run.spec, run.cfg), results)
    return verdict.stop_reason


def record_step(run: Run, result: StepResult, bar) -> None:
    """Count, log and report one optimizer step that ran."""
    state = run.state
    state.tokens += result.tokens
    run.throughput.record(result.input_tokens, result.row_length)
    if state.step % run.cfg.log_interval == 0 or state.step == run.total_steps:
        log_step(run, result, bar)
    for callback in run.callbacks:
        callback.on_step_end(run, result)


@dataclass
class StepInput:
    """What one optimizer step trains on; no micro-batches means the step is skipped."""

    consumed: int                # loader batches this step takes from the epoch (0 when it reuses a rollout)
    micro_batches: list[MicroBatch]
    metrics: dict[str, tuple[float, float]]  # the rollout's own metrics: name -> (sum, count) on this process
    ends_rollout: bool = True    # the last step on this rollout
    result: StepResult | None = None  # set by the loop once the step ran


def step_batches(run: Run) -> Iterator[StepInput]:
    """Where an optimizer step's micro-batches come from, for each remaining step of the current epoch.
    An offline stage trains on the loader's window of `accumulation_steps` batches; a stage with a
    rollout turns that window into micro-batches itself, for `steps_per_rollout` steps."""
    cfg, acc, state = run.cfg, run.accelerator, run.state
    dataset, plan = run.data.for_epoch(state.epoch)
    run.ctx.dataset = dataset
    loader = make_loader(dataset, lambda rows: run.spec.collate(rows, run.ctx.tokenizer, cfg), cfg.batch_size,
                         acc.num_processes, acc.process_index, cfg.seed, state.epoch,
                         skip_batches=state.batch_in_epoch, num_workers=cfg.dataloader_workers,
                         lengths=row_lengths(dataset) if cfg.group_by_length else None,
                         with_index=run.spec.row_index, plan=plan)
    batches = iter(loader)
    while window := list(itertools.islice(batches, cfg.accumulation_steps)):
        if run.spec.rollout is None:
            yield StepInput(len(window), window, {})
            continue
        made = rollout(run, window)
        made = made if isinstance(made, Rollout) else Rollout(made)
        yield from rollout_steps(run, made, len(window))


def rollout_steps(run: Run, made: Rollout, consumed: int) -> Iterator[StepInput]:
    """The steps_per_rollout steps on one rollout. Steps the rollout did not plan, and every step after the
    stage stopped reusing it (on metrics all processes share), are skipped, so all processes stay in step."""
    plan, last = made.plan(run.steps_per_rollout), run.steps_per_rollout - 1
    if len(plan) > run.steps_per_rollout:
        raise RuntimeError(f"stage '{run.spec.name}': its rollout planned {len(plan)} steps; its steps_per_rollout "
                           f"allows {run.steps_per_rollout}")
    stopped = False
    for k in range(run.steps_per_rollout):
        step = StepInput(consumed if k == 0 else 0, plan[k] if k < len(plan) and not stopped else [],
                         made.metrics, k == last)
        yield step
        if step.result is not None and run.spec.stop_reusing is not None:
            stopped = stopped or run.spec.stop_reusing(step.result.metrics, run.cfg)


def rollout(run: Run, window: list[dict]) -> list[MicroBatch] | Rollout:
    """The stage's rollout on this step's loader batches: no gradients, eval mode (dropout off, the
    KV cache on for generation), on the unwrapped model with ZeRO-3's shards gathered."""
    model = run.accelerator.unwrap_model(run.model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), gathered_parameters(run.accelerator, model):
            return run.spec.rollout(model, [to_device(b, run.accelerator.device) for b in window], run.cfg, run.ctx)
    finally:
        model.train(was_training)


def optimizer_step(run: Run, step: StepInput) -> StepResult:
    """Forward and backward every micro-batch of one optimizer step, normalised over the whole step, then update."""
    acc, cfg, spec = run.accelerator, run.cfg, run.spec
    micro_batches = [counted(b, spec) for b in step.micro_batches]
    units, tokens, inputs = reduce_sum(acc, [sum(b.loss_units for b in micro_batches),
                                             sum(b.label_tokens for b in micro_batches),
                                             sum(b.input_tokens for b in micro_batches)])
    units = max(units, 1.0)
    scale = acc.num_processes * cfg.accumulation_steps / units
    # DeepSpeed steps its optimizer inside every backward that syncs, so a step holds at most one window.
    if run.uses_deepspeed and len(micro_batches) > cfg.accumulation_steps:
        raise RuntimeError(f"stage '{spec.name}': a step of {len(micro_batches)} micro-batches under DeepSpeed, "
                           f"whose optimizer steps every accumulation_steps ({cfg.accumulation_steps}) micro-batches")
    loss_sum, sums, counts = 0.0, {}, {}
    for i, batch in enumerate(micro_batches):
        tensors = to_device(batch.tensors, acc.device)
        # The last micro-batch syncs, and every accumulation_steps-th one counted back from it: where
        # accelerate's own counter syncs in a full window, so a short one (the end of an epoch, a short
        # rollout plan) still syncs and steps. Syncing more than once sums the same gradient under DDP.
        with gradient_sync(acc, run.model, (len(micro_batches) - 1 - i) % cfg.accumulation_steps == 0):
            out = spec.loss(run.model, tensors, cfg, run.ctx)
            for callback in run.callbacks:
                callback.on_micro_batch_loss(run, out)
            acc.backward(out.loss_sum * scale)
        loss_sum += out.loss_sum.detach().float()
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
            counts[k] = counts.get(k, 0.0) + float(out.metric_units.get(k, 0.0))
    loss, metrics = step_metrics(acc, loss_sum, units, sums, counts, step.metrics)
    result = StepResult(loss=loss, metrics=metrics, tokens=int(tokens), input_tokens=int(inputs),
                        row_length=max((row_length(b) for b in micro_batches), default=0),
                        lr=run.scheduler.get_last_lr()[0])
    result.grad_norm = apply_update(run, result.loss)
    return result


def gradient_sync(acc, model, sync: bool):
    """The context of one micro-batch's forward and backward: whether its backward syncs gradients across
    processes (DDP's all-reduce) and ends the accumulation, so that Accelerate's optimizer steps and
    DeepSpeed takes its step inside backward. What `Accelerator.accumulate` does, decided by the caller
    rather than by a counter that a window shorter than gradient_accumulation_steps would leave mid-count."""
    acc.sync_gradients = sync
    return contextlib.nullcontext() if sync else acc.no_sync(model)


def step_metrics(acc, loss_sum, units: float, sums: dict, counts: dict,
                 rollout_metrics: dict[str, tuple[float, float]]) -> tuple[float, dict[str, float]]:
    """(loss, metrics) of a step, every sum and count reduced over all processes in one collective. A metric
    is divided by its own summed count where it has one, else by the step's loss units."""
    names = sorted(sums) + sorted(rollout_metrics)
    pairs = [(sums[k], counts[k]) for k in sorted(sums)] + [rollout_metrics[k] for k in sorted(rollout_metrics)]
    reduced = reduce_sum(acc, [loss_sum] + [v for pair in pairs for v in pair])
    metrics = {}
    for i, name in enumerate(names):
        total, count = reduced[1 + 2 * i], reduced[2 + 2 * i]
        metrics[name] = total / (count if count > 0 else units)
    return reduced[0] / units, metrics


def apply_update(run: Run, loss: float) -> float | None:
    """Clip and step, unless the loss or the gradient is not finite (nan_policy); returns the gradient norm
    before clipping. DeepSpeed clips (gradient_clipping) and steps inside backward, so there it is only read."""
    cfg, acc = run.cfg, run.accelerator
    if run.uses_deepspeed:
        norm = run.model.get_global_grad_norm()
    else:
        norm = acc.clip_grad_norm_(run.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    grad_norm = float(norm) if norm is not None else None
    if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
        if not run.uses_deepspeed:
            run.optimizer.step()
    elif cfg.nan_policy == "stop" or run.uses_deepspeed:
        raise NonFiniteLoss(f"step {run.state.step + 1}: loss {loss}, gradient norm {grad_norm}. Stopped "
                            "without saving: the newest checkpoint in checkpoints/ is the last good state "
                            "(nan_policy skip_step would skip such steps instead).")
    else:
        run.state.skipped_steps += 1
        run.say(f"\nstep {run.state.step + 1}: non-finite loss or gradient, update skipped "
                f"({run.state.skipped_steps} so far)")
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return grad_norm


def skip_update(run: Run) -> None:
    """A step the rollout did not train: the schedule still advances, as if it had."""
    run.scheduler.step()


def log_step(run: Run, result: StepResult, bar) -> None:
    state = run.state
    per_epoch = run.data.steps_in_epoch(state.epoch, run.accelerator.num_processes)
    epoch = state.epoch + state.batch_in_epoch / max(1, per_epoch * run.cfg.accumulation_steps)
    row = {"step": state.step, "epoch": epoch, "lr": result.lr, "grad_norm": result.grad_norm, "tokens": state.tokens,
           **run.throughput.rates(state.tokens, state.elapsed_sec), "world_size": run.accelerator.num_processes,
           "skipped_steps": state.skipped_steps, "loss": result.loss, **result.metrics}
    run.metrics_log.write(row)
    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{result.lr:.2e}", tok_s=f"{row['tokens_per_sec']:.0f}")


def checkpoint(run: Run) -> Path:
    run.state.elapsed_sec += run.throughput.take_elapsed()
    return save_checkpoint(run.accelerator, run.out_dir, run.state, run.cfg.save_total_limit, run.ctx.state)


def save_final(run: Run) -> Path:
    """final/: the last weights."""
    return save_model_dir(run, "final")


def save_best(run: Run, metric: str, results: dict[str, float]) -> Path:
    """best/: the weights at the best value of the monitored metric so far, with what made them best."""
    record = {"metric": metric, "mode": best_mode(run.cfg, metric), "value": results[metric],
              "step": run.state.step, "eval": results}
    return save_model_dir(run, "best", record, BEST_FILE)
