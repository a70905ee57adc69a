"""What a logged step reports beyond the loss: throughput, MFU, peak memory and wall time.

Throughput counts tokens between two logged steps; the counters are summed over ranks by the step
itself (engine.StepResult), so every figure here is for the whole run, not one process.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from minimind_scale.data.batching import unwrap_config
from minimind_scale.training.flops import device_peak_flops, train_flops_per_token


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


class Throughput:
    """Counters since the last logged step, turned into the rates of the next log row."""

    def __init__(self, accelerator, model, n_params: int, n_trainable: int, peak_tflops, tokens: int):
        self.accelerator = accelerator
        self.precision = accelerator.mixed_precision if accelerator.mixed_precision != "no" else "fp32"
        self.peak_flops = device_peak_flops(self.precision, peak_tflops)
        self.model_config = unwrap_config(accelerator.unwrap_model(model))
        self.trainable_share = n_trainable / n_params
        self.tokens_at_last_log = tokens
        self.inputs = 0
        self.flops = 0.0
        self.started = self.last_log = time.time()

    def start(self) -> None:
        reset_peak_memory()
        self.started = self.last_log = time.time()

    def record(self, input_tokens: int, row_length: int) -> None:
        self.inputs += input_tokens
        if self.model_config is not None:
            self.flops += input_tokens * train_flops_per_token(self.model_config, row_length, self.trainable_share)

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (an evaluation) out of the training time and the next rates."""
        self.started += seconds
        self.last_log += seconds

    def take_elapsed(self) -> float:
        """Seconds since start or the previous call (the trainer state adds them up across resumes)."""
        now = time.time()
        elapsed, self.started = now - self.started, now
        return elapsed

    def rates(self, tokens: int, elapsed_before: float) -> dict:
        """The throughput fields of a log row, `tokens` being the run's loss-bearing tokens so far; resets the
        counters."""
        now = time.time()
        span = max(now - self.last_log, 1e-9)
        row = {"tokens_per_sec": (tokens - self.tokens_at_last_log) / span, "input_tokens_per_sec": self.inputs / span,
               "elapsed_sec": elapsed_before + now - self.started, "peak_mem_mb": peak_memory_mb(self.accelerator)}
        if self.peak_flops:
            row["mfu"] = self.flops / span / (self.peak_flops * self.accelerator.num_processes)
        self.last_log, self.tokens_at_last_log, self.inputs, self.flops = now, tokens, 0, 0.0
        return row
