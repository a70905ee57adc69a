"""Peak memory and time of one forward+backward with cross_entropy full vs chunked.

    python benchmarks/loss_memory.py [--model minimind2-small] [--batch_size 4] [--seq_len 1024]
                                     [--steps 2] [--out benchmarks/results/loss_memory.json]

Each variant runs in a fresh process, so one's freed memory cannot hide the other's peak. Memory is
that of the first step: allocated CUDA memory on a GPU, else resident memory (VmHWM, reset through
/proc/self/clear_refs before the step) minus the resident memory just before it. On a CPU the children
run with a fixed glibc mmap threshold, so every tensor is its own mapping and freed memory leaves the
resident set at once: with glibc's default, heap reuse made the same step's peak vary by ~200 MB between
runs. Time is the fastest of `--steps` further steps (the machine may be shared). The tokenizer is
../shared/tokenizers/minimind (vocabulary 6400) when present.
Prints a Markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
MINIMIND_TOKENIZER = REPO.parent / "shared" / "tokenizers" / "minimind"
VARIANTS = ("full", "chunked")


def resident_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0]) / 1024


def reset_peak() -> float:
    """Start peak accounting now; returns the memory in use (MB) the peak is measured from."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS
    return resident_mb("VmRSS")


def peak() -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return resident_mb("VmHWM")


def measure(variant: str, args) -> dict:
    """One variant in this process: the first step's peak, then the mean time of `args.steps` steps."""
    import torch

    from minimind_scale.losses.causal_lm import causal_lm_loss
    from minimind_scale.losses.chunked import enable_loss_forward
    from minimind_scale.models.build import build_model, load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(str(MINIMIND_TOKENIZER) if MINIMIND_TOKENIZER.is_dir() else None)
    torch.manual_seed(0)
    model = build_model(args.model, tok).to(device)
    if variant != "full":
        enable_loss_forward(model, variant)
    cfg = SimpleNamespace(cross_entropy=variant, batch_size=args.batch_size, max_seq_len=args.seq_len)
    ids = torch.randint(0, len(tok), (args.batch_size, args.seq_len), device=device)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    def step() -> float:
        model.zero_grad(set_to_none=True)
        out = causal_lm_loss(model, batch, cfg)
        out.loss_sum.backward()
        return float(out.loss_sum.detach())

    before = reset_peak()
    loss = step()
    top = peak()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"variant": variant, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "vocab": len(tok), "peak_mb": top, "step_peak_mb": top - before,
            "sec_per_step": min(times), "loss_sum": loss}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minimind2-small")
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2,
                    help="timed steps after the measured first one (the fastest is kept)")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process's job
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "loss_memory.json"))
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return
    results = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model, "--batch_size",
               str(args.batch_size), "--seq_len", str(args.seq_len), "--steps", str(args.steps)]
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO, env=env)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    r0 = results[0]
    logits_mb = args.batch_size * args.seq_len * r0["vocab"] * 4 / 2**20
    print(f"\n{args.model}, batch {args.batch_size}x{args.seq_len}, vocab {r0['vocab']}, fp32, {r0['device']} "
          f"({r0['threads']} threads); one [tokens x vocab] fp32 logits tensor is {logits_mb:.0f} MB\n")
    print("| cross_entropy | peak memory (MB) | step peak above start (MB) | s/step | loss sum |\n"
          "|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['peak_mb']:.0f} | {r['step_peak_mb']:.0f} | {r['sec_per_step']:.2f} "
              f"| {r['loss_sum']:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len,
                                          "logits_fp32_mb": logits_mb, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
