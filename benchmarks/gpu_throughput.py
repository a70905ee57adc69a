"""Tokens/s and model FLOPs utilisation (MFU) on one GPU, for each throughput option on its own and all together.

    python benchmarks/gpu_throughput.py [--model minimind3] [--steps 40] [--warmup 10] [--batch_size 32]
        [--max_seq_len 512] [--out benchmarks/results/gpu_throughput.json]

Runs the real `pretrain` command once per variant, packed rows, bf16, on the pretraining text in
../shared/data, and reads each run's metrics.jsonl. The first `--warmup` steps are left out (compile,
allocator and kernel autotuning settle there); the rest give loss-bearing tokens/s, MFU (the engine's
PaLM FLOP count over the GPU's dense bf16 peak) and peak allocated memory.

Variants (each against the plain one: sdpa attention, full logits, no compile):
  sdpa                     the baseline
  flash_attention_2        varlen flash attention on the packed rows (needs flash-attn)
  compile                  torch.compile
  gradient_checkpointing   recompute activations in backward
  chunked cross-entropy    the head and loss on 1024 loss-bearing positions at a time
  liger cross-entropy      liger-kernel's fused linear cross-entropy (needs liger-kernel)
  dataloader workers       2 loader processes, pinned memory
  all fast options         every option above that is installed, except gradient checkpointing
A variant whose package is missing is reported as skipped, with the reason. `--allow_cpu` runs the
script on a CPU (fp32, no MFU) to check that it works, not to measure anything.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = [SHARED / "data" / name for name in ("pretrain_en_c4wiki.jsonl", "pretrain_zh_fortunes.jsonl",
                                            "pretrain_zh_poetry_8k.jsonl")]

VARIANTS: dict[str, dict] = {
    "sdpa": {},
    "flash_attention_2": {"attn_implementation": "flash_attention_2"},
    "compile": {"compile": True},
    "gradient_checkpointing": {"gradient_checkpointing": True},
    "chunked cross-entropy": {"cross_entropy": "chunked"},
    "liger cross-entropy": {"cross_entropy": "liger"},
    "dataloader workers": {"dataloader_workers": 2},
}


def missing_package(options: dict, cuda: bool) -> str | None:
    """Why a variant cannot run here, or None."""
    needs = []
    if options.get("attn_implementation", "").startswith("flash"):
        needs.append(("flash_attn", "flash-attn"))
    if options.get("cross_entropy") == "liger":
        needs.append(("liger_kernel", "liger-kernel"))
    if needs and not cuda:
        return "needs a CUDA GPU"
    for module, package in needs:
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed"
    return None


def all_fast_options(cuda: bool) -> dict:
    merged = {}
    for name in ("flash_attention_2", "compile", "liger cross-entropy", "dataloader workers"):
        if missing_package(VARIANTS[name], cuda) is None:
            merged.update(VARIANTS[name])
    if "cross_entropy" not in merged:
        merged.update(VARIANTS["chunked cross-entropy"])
    return merged


def run_pretrain(name: str, options: dict, args, work: Path) -> list[dict]:
    out = work / name.replace(" ", "_")
    cmd = [sys.executable, "-m", "minimind_scale", "pretrain", "--model", args.model,
           "--tokenizer", str(args.tokenizer),
           "--data_path", *map(str, args.data), "--max_seq_len", str(args.max_seq_len), "--batch_size",
           str(args.batch_size), "--accumulation_steps", "1", "--max_steps", str(args.steps), "--log_interval", "1",
           "--save_interval", "0", "--resume", "never", "--packing", "true", "--dtype", args.dtype,
           "--attn_implementation", "sdpa", "--out_dir", str(out)]
    for key, value in options.items():
        cmd += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    env = dict(os.environ, MINIMIND_SCALE_CACHE=str(work / "cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summarise(name: str, options: dict, metrics: list[dict], warmup: int) -> dict:
    timed = metrics[warmup:] or metrics[-1:]
    mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return {
        "variant": name,
        "options": options,
        "steps_timed": len(timed),
        "loss_tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in timed),
        "all_tokens_per_sec": statistics.median(r["input_tokens_per_sec"] for r in timed),
        "mfu": statistics.median(mfu) if mfu else None,
        "peak_mem_mb": max(r["peak_mem_mb"] for r in timed),
        "final_loss": timed[-1]["loss"],
    }


def _portable(value):
    """Settings as written to the results file: paths relative to the repository, not this machine."""
    if isinstance(value, Path):
        return os.path.relpath(value.resolve(), REPO)
    if isinstance(value, list):
        return [_portable(v) for v in value]
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minimind3")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10, help="first steps left out of every figure")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--max_seq_len", type=int, default=512)
    ap.add_argument("--data", type=Path, nargs="+", default=DATA)
    ap.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "minimind")
    ap.add_argument("--only", nargs="+", choices=[*VARIANTS, "all fast options"], help="run these variants only")
    ap.add_argument("--allow_cpu", action="store_true", help="run on a CPU in fp32 to check the script (no MFU)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_throughput.json")
    args = ap.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        ap.error("no CUDA GPU here; this benchmark measures GPUs (--allow_cpu checks the script on a CPU)")
    args.dtype = "bf16" if cuda else "fp32"
    device = torch.cuda.get_device_name() if cuda else "cpu"
    variants = {**VARIANTS, "all fast options": all_fast_options(cuda)}
    chosen = args.only or list(variants)

    results, skipped = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            reason = missing_package(variants[name], cuda)
            if reason:
                skipped[name] = reason
                print(f"skipped {name}: {reason}")
                continue
            print(f"running {name} ...", flush=True)
            results.append(summarise(name, variants[name], run_pretrain(name, variants[name], args, Path(tmp)),
                                     args.warmup))

    cols = ["variant", "loss_tokens_per_sec", "all_tokens_per_sec", "mfu", "peak_mem_mb", "final_loss"]
    print(f"\npretrain, {args.model}, packed rows, batch {args.batch_size} x {args.max_seq_len}, {args.dtype}, "
          f"{device}, {args.steps} steps (median of the last {args.steps - args.warmup})\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        cells = [r["variant"]] + [("—" if r[c] is None else f"{r[c]:.4f}" if c == "mfu" else f"{r[c]:.1f}")
                                  for c in cols[1:]]
        print("| " + " | ".join(cells) + " |")
    for name, reason in skipped.items():
        print(f"| {name} | skipped: {reason} |")
    settings = {k: _portable(v) for k, v in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {**settings, "device": device}, "results": results,
                                    "skipped": skipped}, indent=1))


if __name__ == "__main__":
    main()
