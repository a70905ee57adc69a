"""SFT throughput with packed vs padded rows, at the same batch of rows per step.

    python benchmarks/sft_throughput.py [--steps 30] [--num_hidden_layers 2] [--threads 2]
        [--out benchmarks/results/sft_throughput.json]

Runs the real `sft` command once per row layout on ../shared/data/sft_zh_alpaca_demo.jsonl with
MiniMind's tokenizer, max_seq_len 512, the minimind2-small shape, batch 8 rows, fp32:
  packed                    --packing true (the default)
  padded                    --packing false: each batch padded to its longest row
  padded, length-grouped    --packing false --group_by_length true
  padded to max_seq_len     --packing false --pad_to max_seq_len: MiniMind's own batches
and reads each run's metrics.jsonl: loss-bearing tokens/s (`tokens_per_sec`) and peak memory (`peak_mem_mb`).
All real tokens per step and the share of padding are recomputed by replaying the run's sampler over
the same cached data set (same seed, same order). The first step is
left out of every rate as warm-up. Prints a Markdown table and writes JSON.
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
SHARED = REPO.parent / "shared"


LAYOUTS = {
    "packed": dict(packing=True),
    "padded": dict(packing=False),
    "padded, length-grouped": dict(packing=False, group_by_length=True),
    "padded to max_seq_len": dict(packing=False, pad_to="max_seq_len"),
}


def run_sft(name: str, args, work: Path) -> list[dict]:
    out = work / name.replace(" ", "_").replace(",", "")
    cmd = [sys.executable, "-m", "minimind_scale", "sft", "--model", "minimind2-small",
           "--num_hidden_layers", str(args.num_hidden_layers), "--data_path", str(args.data),
           "--tokenizer", str(args.tokenizer), "--max_seq_len", "512", "--batch_size", str(args.batch_size),
           "--accumulation_steps", "1", "--dtype", "fp32", "--max_steps", str(args.steps), "--log_interval", "1",
           "--save_interval", "0", "--num_proc", "1", "--resume", "never", "--seed", str(args.seed),
           "--out_dir", str(out)]
    for key, value in LAYOUTS[name].items():
        cmd += [f"--{key}", str(value).lower()]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MINIMIND_SCALE_CACHE=str(work / "cache"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def replay_rows(name: str, args, work: Path) -> list[tuple[int, int]]:
    """(real tokens, padded slots) of every optimizer step of the run, from its own data order."""
    os.environ["MINIMIND_SCALE_CACHE"] = str(work / "cache")
    from minimind_scale.data.loader import make_loader
    from minimind_scale.data.prepare import prepare_dataset
    from minimind_scale.data.rows import row_lengths
    from minimind_scale.models.build import load_tokenizer
    from minimind_scale.training.registry import discover, get_stage

    discover()
    spec = get_stage("sft")
    cfg = spec.config(data_path=[str(args.data)], tokenizer=str(args.tokenizer), max_seq_len=512, num_proc=1,
                      seed=args.seed, batch_size=args.batch_size, **LAYOUTS[name])
    dataset, _, _ = prepare_dataset(spec, cfg, load_tokenizer(cfg.tokenizer), log=lambda *_: None)
    lengths = row_lengths(dataset)
    grouped = lengths if cfg.group_by_length else None
    steps, epoch = [], 0
    while len(steps) < args.steps:  # the engine starts a new epoch's order when one runs out
        for batch in make_loader([{"n": int(n)} for n in lengths], lambda rows: rows, args.batch_size, 1, 0, args.seed,
                                 epoch, lengths=grouped):
            n = [r["n"] for r in batch]
            width = cfg.max_seq_len if cfg.pad_to == "max_seq_len" else max(n)
            steps.append((sum(n), width * len(n)))
            if len(steps) == args.steps:
                break
        epoch += 1
    return steps


def summarise(name: str, metrics: list[dict], steps: list[tuple[int, int]]) -> dict:
    first, last = metrics[0], metrics[-1]
    seconds = last["elapsed_sec"] - first["elapsed_sec"]
    timed = steps[1:len(metrics)]
    return {
        "rows": name,
        "steps_timed": len(metrics) - 1,
        "sec_per_step": seconds / max(1, len(metrics) - 1),
        "loss_tokens_per_sec": (last["tokens"] - first["tokens"]) / seconds,
        "all_tokens_per_sec": sum(t for t, _ in timed) / seconds,
        "padding_share": 1 - sum(t for t, _ in timed) / max(1, sum(s for _, s in timed)),
        "peak_mem_mb": max(r["peak_mem_mb"] for r in metrics),
        "final_loss": last["loss"],
    }


def _portable(value) -> str:
    """Settings as written to the results file: paths relative to the repository, not this machine."""
    if isinstance(value, Path):
        return os.path.relpath(value.resolve(), REPO)
    return str(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--num_hidden_layers", type=int, default=2, help="8 is minimind2-small's own depth")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the training runs")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "sft_zh_alpaca_demo.jsonl")
    ap.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "minimind")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sft_throughput.json")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first step is warm-up)")

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in LAYOUTS:
            results.append(summarise(name, run_sft(name, args, work), replay_rows(name, args, work)))
    packed = results[0]
    ratios = {r["rows"]: packed["loss_tokens_per_sec"] / r["loss_tokens_per_sec"] for r in results[1:]}

    cols = ["rows", "sec_per_step", "loss_tokens_per_sec", "all_tokens_per_sec", "padding_share", "peak_mem_mb",
            "final_loss"]
    print(f"sft, minimind2-small shape x {args.num_hidden_layers} layers, batch {args.batch_size} rows x 512, fp32, "
          f"{args.steps} steps (first one not timed), OMP_NUM_THREADS={args.threads}\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    print()
    for name, ratio in ratios.items():
        print(f"packed / {name}: {ratio:.2f}x the loss-bearing tokens/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: _portable(v) for k, v in vars(args).items()}, "results": results,
                                    "packed_over_each_loss_tokens_per_sec": ratios}, indent=1))


if __name__ == "__main__":
    main()
