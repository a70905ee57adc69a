"""PPO against GRPO on the same policy, prompts and rows per rollout: peak memory and time per rollout.

    python benchmarks/ppo_vs_grpo.py [--rollouts 4] [--rows 8] [--num_generations 4] [--max_gen_len 64]
        [--dtype fp32] [--hidden_size H] [--num_hidden_layers L] [--threads 2]
        [--out benchmarks/results/ppo_vs_grpo.json]

Both stages run the real command on the minimind2-small shape (random weights, MiniMind's tokenizer) and
the prompts of grpo_throughput.py, with --rows completions per rollout and process:
  grpo  rows / num_generations prompts × num_generations completions, one update per rollout (CISPO,
        beta 0.1: a frozen reference replica);
  ppo   rows prompts × 1 completion, ppo_epochs 2 over one mini-batch of all rows (2 updates per
        rollout), kl_coef 0.02 (the same reference replica) and a critic of the policy's size trained beside it.
Reported per stage: the parameters trained, the peak memory of the process during training (VmHWM on a
CPU, allocated CUDA memory on a GPU; telemetry.py), and the median wall seconds per rollout (all its
updates) after the first rollout. Random policies rarely stop early, so completions run to --max_gen_len
in both stages.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from grpo_throughput import REPO, SHARED, _portable, write_policy, write_prompts


def run(stage: str, args, policy: Path, prompts: Path, work: Path) -> list[dict]:
    out = work / stage
    common = ["--model", str(policy), "--data_path", str(prompts), "--out_dir", str(out),
              "--reward_funcs", "minimind_format", "--max_gen_len", str(args.max_gen_len), "--dtype", args.dtype,
              "--log_interval", "1", "--save_interval", "0", "--num_proc", "1", "--resume", "never",
              "--seed", str(args.seed)]
    if stage == "grpo":
        extra = ["--batch_size", str(args.rows // args.num_generations), "--num_generations",
                 str(args.num_generations), "--max_steps", str(args.rollouts)]
    else:
        extra = ["--batch_size", str(args.rows), "--ppo_epochs", "2", "--max_steps", str(2 * args.rollouts),
                 "--target_kl", "1e9"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MINIMIND_SCALE_CACHE=str(work / "cache"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run([sys.executable, "-m", "minimind_scale", stage, *common, *extra], check=True, env=env, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["step"])


def summary(rows: list[dict], updates_per_rollout: int) -> dict:
    ends = [r for r in rows if r["step"] % updates_per_rollout == 0]
    seconds = [b["elapsed_sec"] - a["elapsed_sec"] for a, b in zip(ends, ends[1:])]
    return {"rollout_sec_median": statistics.median(seconds) if seconds else None,
            "peak_mem_mb": max(r["peak_mem_mb"] for r in rows), "rollouts_timed": len(seconds),
            "completion_length": statistics.mean(r["completion_length"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rollouts", type=int, default=4, help="rollouts per stage (the first is not timed)")
    ap.add_argument("--rows", type=int, default=8, help="completions per rollout and process")
    ap.add_argument("--num_generations", type=int, default=4, help="grpo's group size (divides --rows)")
    ap.add_argument("--max_gen_len", type=int, default=64)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--hidden_size", type=int)
    ap.add_argument("--num_hidden_layers", type=int)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "sft_zh_alpaca_demo.jsonl")
    ap.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "minimind")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ppo_vs_grpo.json")
    args = ap.parse_args()
    if args.rows % args.num_generations or args.rollouts < 2:
        ap.error("--num_generations must divide --rows, and --rollouts be at least 2")

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        policy, params, _ = write_policy(args, work)
        prompts, _, _ = write_prompts(args, work)
        for stage, updates, trained in (("grpo", 1, params), ("ppo", 2, 2 * params)):
            print(f"running {stage} ...", flush=True)
            results[stage] = {"trained_params": trained, "updates_per_rollout": updates,
                              **summary(run(stage, args, policy, prompts, work), updates)}
    print(f"\nminimind2-small shape ({params / 1e6:.1f}M-parameter policy), {args.rows} completions per rollout, "
          f"max_gen_len {args.max_gen_len}, {args.dtype}, {device}, OMP_NUM_THREADS={args.threads}\n")
    print("| stage | trained parameters | updates per rollout | peak memory MiB | seconds per rollout (median) |")
    print("|---|---|---|---|---|")
    for stage, r in results.items():
        print(f"| {stage} | {r['trained_params'] / 1e6:.1f}M | {r['updates_per_rollout']} | {r['peak_mem_mb']:.0f} | "
              f"{r['rollout_sec_median']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: _portable(v) for k, v in vars(args).items() if k != "out"}
    args.out.write_text(json.dumps({"device": device, "settings": settings, "results": results}, indent=1) + "\n")
    print(f"\nwritten to {_portable(args.out)}")


if __name__ == "__main__":
    main()
