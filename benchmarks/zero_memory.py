"""Per-process peak memory of DDP vs DeepSpeed ZeRO-1/2/3 at 2 processes, same model and batch.

    python benchmarks/zero_memory.py [--model minimind2] [--steps 3] [--out benchmarks/results/zero_memory.json]

Runs the real `sft` command under torchrun for each backend and reads `peak_mem_mb` (the largest
per-process peak over ranks: resident memory on CPU, allocated CUDA memory on GPUs) from each run's
metrics.jsonl. Prints a Markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BACKENDS = {"DDP": None, "ZeRO-1": "zero1.json", "ZeRO-2": "zero2.json", "ZeRO-3": "zero3.json"}


def run(backend: str, ds_file: str | None, args, work: Path) -> dict:
    out = work / backend
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "minimind_scale", "pretrain", "--model", args.model, "--data_path", str(args.data),
           "--out_dir", str(out), "--max_steps", str(args.steps), "--batch_size", str(args.batch_size),
           "--accumulation_steps", "1", "--max_seq_len", str(args.max_seq_len), "--dtype", "fp32",
           "--log_interval", "1", "--save_interval", "0", "--num_proc", "1", "--resume", "never"]
    if args.hidden_size:
        cmd += ["--hidden_size", str(args.hidden_size)]
    if args.num_hidden_layers:
        cmd += ["--num_hidden_layers", str(args.num_hidden_layers)]
    if ds_file:
        cmd += ["--deepspeed", str(REPO / "ds_configs" / ds_file)]
    # On CPUs peak_mem_mb is resident memory. glibc would keep freed blocks of up to 32 MB in its heap
    # (its mmap threshold grows with every large free), so resident memory would show the allocator's
    # high-water mark rather than what is live; serving large blocks by mmap returns them at once.
    env = dict(os.environ, OMP_NUM_THREADS="1", MINIMIND_SCALE_CACHE=str(work / "cache"), DS_ACCELERATOR="cpu",
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"backend": backend, "peak_mem_mb": max(r["peak_mem_mb"] for r in rows),
            "sec_per_step": rows[-1]["elapsed_sec"] / len(rows), "final_loss": rows[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minimind2")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--hidden_size", type=int, help="override the preset's width")
    ap.add_argument("--num_hidden_layers", type=int, help="override the preset's depth")
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--max_seq_len", type=int, default=256)
    ap.add_argument("--data", default=str(REPO / "minimind_scale" / "assets" / "demo" / "pretrain.jsonl"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "zero_memory.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(name, f, args, Path(tmp)) for name, f in BACKENDS.items()]
    print(f"\n{args.model} (hidden {args.hidden_size or 'preset'}), 2 processes, "
          f"batch {args.batch_size}x{args.max_seq_len} per process, fp32, {args.steps} steps\n")
    print("| backend | peak memory per process (MB) | s/step |\n|---|---|---|")
    for r in results:
        print(f"| {r['backend']} | {r['peak_mem_mb']:.0f} | {r['sec_per_step']:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model,
                                          "settings": {k: v for k, v in vars(args).items() if k != "out"},
                                          "results": results}, indent=1))


if __name__ == "__main__":
    main()
