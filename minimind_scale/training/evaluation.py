"""Validation during training: measure every held-out set, log one row, keep best/, stop early.

Exactness (docs/watching.md): each process measures a contiguous shard of a set and every quantity is a
sum (a loss sum and its units, a metric sum and its count) accumulated in float64 and summed over the
processes in one collective, then divided once: the token-weighted loss of the whole set, independent of
the process count and batch size, the same number `eval` prints for the same rows and weights.

Evaluation runs on the unwrapped model (its parameters gathered under ZeRO-3), without gradients, in eval
mode, inside a forked RNG seeded with the run's seed: it never moves the training RNG, so a run with
evaluation trains on the same batches with the same dropout and sampling as one without.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time

import torch
from tqdm.auto import tqdm

from minimind_scale.data.batching import to_device
from minimind_scale.data.loader import ROW_INDEX
from minimind_scale.training.distributed import reduce_sum
from minimind_scale.training.held_out import best_mode, eval_config, monitored_metric
from minimind_scale.training.model_dirs import gathered_parameters


def due(run, step: int, checkpointing: bool, ends_rollout: bool) -> bool:
    """Whether the held-out sets are measured after `step`: every eval_interval steps (a rollout's steps
    count together, as for checkpoints), else at every checkpoint; and always after the last step."""
    if not run.ctx.eval_sets or not ends_rollout:
        return False
    if step == run.total_steps:
        return True
    every = run.cfg.eval_interval
    if every is None:
        return checkpointing
    return step // every != (step - run.steps_per_rollout) // every


def evaluate(run) -> dict[str, float]:
    """{`eval/<set>/<metric>`: value} over every held-out set, the same on every process."""
    model = run.accelerator.unwrap_model(run.model)
    was_training = model.training
    model.eval()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.no_grad(), gathered_parameters(run.accelerator, model), torch.random.fork_rng(devices=devices):
            torch.manual_seed(run.cfg.seed)
            totals = {name: measure_set(run, model, name, rows) for name, rows in run.ctx.eval_sets.items()}
    finally:
        model.train(was_training)
    keys = [(name, metric) for name, sums in totals.items() for metric in sums]
    flat = reduce_sum(run.accelerator, [v for name, metric in keys for v in totals[name][metric]])
    results: dict[str, float] = {}
    for i, (name, metric) in enumerate(keys):
        total, count = flat[2 * i], flat[2 * i + 1]
        results[f"eval/{name}/{metric}"] = total / count if count > 0 else float("nan")
    if run.spec.perplexity_of is not None:
        for name in totals:
            mean = results.pop(f"eval/{name}/_perplexity_of", results.get(f"eval/{name}/{run.spec.perplexity_of}"))
            results[f"eval/{name}/ppl"] = math.exp(mean) if mean < 700 else float("inf")
    return results


def measure_set(run, model, name: str, rows) -> dict[str, list[float]]:
    """{metric: [sum, count]} of this process's contiguous shard of one held-out set. Every process runs the
    same number of batches (a short shard repeats a batch whose sums are dropped), so hooks that communicate
    inside a forward never wait on a process that has finished."""
    acc, cfg = run.accelerator, run.cfg
    eval_cfg = eval_config(run.spec, cfg, cfg.data_path)
    batch_size = cfg.eval_batch_size or cfg.batch_size
    world, rank, n = acc.num_processes, acc.process_index, len(rows)
    per_rank = -(-n // world)
    start, stop = min(n, rank * per_rank), min(n, (rank + 1) * per_rank)
    ctx = dataclasses.replace(run.ctx, dataset=rows, evaluating=name)
    sums: dict[str, list[float]] = {}
    batches = -(-per_rank // batch_size)
    bar = tqdm(total=batches, desc=f"eval {name}", file=sys.stdout, leave=False, dynamic_ncols=True,
               disable=not acc.is_main_process)
    for b in range(batches):
        lo, hi = start + b * batch_size, min(stop, start + (b + 1) * batch_size)
        real = hi > lo
        indices = list(range(lo, hi)) if real else [min(start, n - 1)]
        batch = run.spec.collate([_row(rows, i, run.spec.row_index) for i in indices], run.ctx.tokenizer, eval_cfg)
        measured = measure_batch(run.spec, model, to_device(batch, acc.device), eval_cfg, ctx)
        if real:
            for metric, (total, count) in measured.items():
                acc_pair = sums.setdefault(metric, [0.0, 0.0])
                acc_pair[0] += float(total)
                acc_pair[1] += float(count)
        bar.update(1)
    bar.close()
    for metric in run.spec.validation_metrics(cfg) if run.spec.evaluate is not None else ():
        sums.setdefault(metric, [0.0, 0.0])  # a process whose shard is empty still joins the collective
    return _ordered(sums, run.spec, cfg)


def _row(rows, i: int, with_index: bool) -> dict:
    return {**rows[i], ROW_INDEX: i} if with_index else rows[i]


def measure_batch(spec, model, batch: dict, cfg, ctx) -> dict[str, tuple[float, float]]:
    """{metric: (sum, count)} of one batch: the stage's own `evaluate`, or its loss (less any regulariser)
    per loss unit, each of its eval_metrics, and the cross-entropy perplexity is derived from."""
    if spec.evaluate is not None:
        return {k: (_number(s), _number(c)) for k, (s, c) in spec.evaluate(model, batch, cfg, ctx).items()}
    out = spec.loss(model, batch, cfg, ctx)
    units = _number(spec.loss_units(batch))
    measured = {"loss": (_number(out.loss_sum) - _number(out.regularizer_sum), units)}
    for metric in spec.eval_metrics:
        measured[metric] = (_number(out.metrics[metric]), _number(out.metric_units.get(metric, units)))
    source = spec.perplexity_of
    if source is not None and source != "loss" and source not in measured:
        measured["_perplexity_of"] = (_number(out.metrics[source]), _number(out.metric_units.get(source, units)))
    return measured


def _number(value) -> float:
    return float(value.detach().double().item()) if isinstance(value, torch.Tensor) else float(value)


def _ordered(sums: dict[str, list[float]], spec, cfg) -> dict[str, list[float]]:
    """The metrics in the order validation_metrics names them (every process alike), helpers last."""
    names = [m for m in spec.validation_metrics(cfg) if m in sums]
    return {m: sums[m] for m in names + sorted(set(sums) - set(names))}


@dataclasses.dataclass
class Verdict:
    improved: bool
    stop_reason: str | None


def track(run, results: dict[str, float]) -> Verdict:
    """Update the best value and the evaluations without improvement (kept in the trainer state, so a
    resumed run goes on counting) and decide whether patience has run out."""
    state, cfg = run.state, run.cfg
    metric = monitored_metric(run.spec, cfg)
    if metric is None:
        return Verdict(False, None)
    value, mode = results[metric], best_mode(cfg, metric)
    better = (value < state.best_value - cfg.early_stopping_threshold if mode == "min"
              else value > state.best_value + cfg.early_stopping_threshold) if state.best_value is not None else True
    improved = math.isfinite(value) and better
    if improved:
        state.best_value, state.best_step, state.evals_without_improvement = value, state.step, 0
    else:
        state.evals_without_improvement += 1
    return Verdict(improved, stopped_early(run))


def stopped_early(run) -> str | None:
    """Why the run stops early, when the monitored metric has gone --early_stopping_patience evaluations
    without improving; else None."""
    state, cfg = run.state, run.cfg
    patience = cfg.early_stopping_patience
    if patience is None or state.evals_without_improvement < patience:
        return None
    return (f"early stopping after step {state.step}: {monitored_metric(run.spec, cfg)} has not improved by more "
            f"than {cfg.early_stopping_threshold:g} for {patience} evaluation(s); the best, {state.best_value:.6g} "
            f"at step {state.best_step}, is in best/")


def evaluate_and_track(run) -> tuple[Verdict, dict[str, float]]:
    """Measure, log the row, report the line, and judge the monitored metric."""
    started = time.time()
    results = evaluate(run)
    seconds = time.time() - started
    run.throughput.exclude(seconds)
    run.metrics_log.write({"step": run.state.step, **results, "time/eval_sec": seconds})
    run.say("\n" + f"step {run.state.step} eval: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    verdict = track(run, results)
    return verdict, results
