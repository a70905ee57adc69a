"""GRPO rollout tokens/s, and how one GRPO step splits into generation, reward, reference and update time.

    python benchmarks/grpo_throughput.py [--steps 6] [--warmup 1] [--num_generations 4] [--batch_size 2]
        [--max_gen_len 128] [--dtype fp32] [--hidden_size H] [--num_hidden_layers L] [--threads 2]
        [--out benchmarks/results/grpo_throughput.json]

Builds a start policy of the minimind2-small shape (random weights: the speed of a step does not
depend on what the model knows, but a random policy rarely emits the end-of-turn token, so nearly
every completion runs to --max_gen_len), with MiniMind's tokenizer from ../shared/tokenizers/minimind
(else the package's own), saves it as a Hugging Face directory, writes the user turns of
../shared/data/sft_zh_alpaca_demo.jsonl (else the bundled demo SFT file) as {"prompt": text} records,
and runs the real `grpo` command on them once (reward function minimind_format, log_interval 1, no
intermediate checkpoints). From the run's metrics.jsonl, for every step after the --warmup ones:
  step          wall seconds of the optimizer step (difference of consecutive `elapsed_sec`)
  generation    `time/generation_sec`: sampling the group of completions (KV cache on)
  reward        `time/reward_sec`: decoding and scoring the completions
  reference     `time/reference_sec`: the frozen reference's log-probs of the completions (beta > 0)
  update        step - (generation + reward + reference): the policy's forward and backward, the
                optimizer step, data loading and logging
  rollout tok/s completion tokens sampled in the step (completion_length x batch_size x num_generations
                x accumulation_steps x world_size) / generation seconds
The table shows the median of each over the timed steps (the share is the median of generation / step);
the JSON file holds the settings, every timed step and the medians.

The engine picks the device: on a GPU the same script runs as it is, with `--dtype bf16` (and usually a
larger --max_gen_len); on a CPU keep the default fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEMO_SFT = REPO / "minimind_scale" / "assets" / "demo" / "sft.jsonl"
PHASES = ("generation", "reward", "reference")


def write_policy(args, work: Path) -> tuple[Path, int, str]:
    """The start policy as a Hugging Face directory; (directory, parameter count, tokenizer used)."""
    import torch

    from minimind_scale.models.build import build_model, count_parameters, load_tokenizer, save_hf

    if args.tokenizer.is_dir():
        tokenizer, used = load_tokenizer(str(args.tokenizer)), _portable(args.tokenizer)
    else:
        tokenizer, used = load_tokenizer(None), "package default"
    torch.manual_seed(args.seed)
    model = build_model("minimind2-small", tokenizer, args.hidden_size, args.num_hidden_layers)
    out = work / "policy"
    save_hf(model, tokenizer, out)
    return out, count_parameters(model)[0], used


def write_prompts(args, work: Path) -> tuple[Path, int, str]:
    """The first user turn of every conversation as a {"prompt": text} record; (file, count, source used)."""
    source = args.data if args.data.is_file() else DEMO_SFT
    prompts = []
    for line in source.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        turns = json.loads(line).get("conversations") or []
        text = next((t.get("content") for t in turns if t.get("role") == "user"), None)
        if isinstance(text, str) and text.strip():
            prompts.append(text)
    out = work / "prompts.jsonl"
    out.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts), encoding="utf-8")
    return out, len(prompts), _portable(source)


def run_grpo(args, policy: Path, prompts: Path, work: Path) -> tuple[list[dict], float]:
    """The run's metrics.jsonl rows and the wall seconds of the whole command (start-up and saving included)."""
    out = work / "grpo"
    cmd = [sys.executable, "-m", "minimind_scale", "grpo", "--model", str(policy),
           "--data_path", str(prompts), "--out_dir", str(out), "--reward_funcs", "minimind_format",
           "--num_generations", str(args.num_generations), "--batch_size", str(args.batch_size),
           "--accumulation_steps", str(args.accumulation_steps), "--max_gen_len", str(args.max_gen_len),
           "--beta", str(args.beta), "--loss_type", args.loss_type, "--dtype", args.dtype,
           "--max_steps", str(args.steps), "--log_interval", "1", "--save_interval", "0", "--num_proc", "1",
           "--resume", "never", "--seed", str(args.seed)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MINIMIND_SCALE_CACHE=str(work / "cache"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["step"]), wall


def step_rows(metrics: list[dict], args) -> list[dict]:
    """One row per step after the warm-up, from consecutive metrics.jsonl rows (log_interval 1)."""
    rows, previous = [], 0.0
    for r in metrics:
        step_sec, previous = r["elapsed_sec"] - previous, r["elapsed_sec"]
        if r["step"] <= args.warmup:
            continue
        phases = {p: r[f"time/{p}_sec"] for p in PHASES}
        completions = args.batch_size * args.num_generations * args.accumulation_steps * r["world_size"]
        tokens = r["completion_length"] * completions
        rows.append({"step": r["step"], "step_sec": step_sec, **{f"{p}_sec": v for p, v in phases.items()},
                     "update_sec": step_sec - sum(phases.values()),
                     "generation_share": phases["generation"] / step_sec if step_sec > 0 else None,
                     "completions": completions, "completion_length": r["completion_length"],
                     "completion_tokens": tokens,
                     "rollout_tokens_per_sec": tokens / phases["generation"] if phases["generation"] > 0 else None,
                     "completion_clipped_ratio": r.get("completion_clipped_ratio"), "reward": r.get("reward"),
                     "kl": r.get("kl"), "loss": r.get("loss"), "peak_mem_mb": r.get("peak_mem_mb"),
                     "world_size": r["world_size"]})
    return rows


MEDIAN_KEYS = ("step_sec", "generation_sec", "generation_share", "reward_sec", "reference_sec", "update_sec",
               "rollout_tokens_per_sec", "completion_length", "completion_tokens")


def medians(rows: list[dict]) -> dict:
    out = {}
    for key in MEDIAN_KEYS:
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    return out


def _portable(value):
    """Settings as written to the results file: paths relative to the repository, not this machine."""
    if isinstance(value, Path):
        return os.path.relpath(value.resolve(), REPO)
    if isinstance(value, list):
        return [_portable(v) for v in value]
    return value


def _fmt(value, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps of the run (warm-up included)")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the medians")
    ap.add_argument("--num_generations", type=int, default=4, help="completions sampled per prompt")
    ap.add_argument("--batch_size", type=int, default=2, help="prompts per micro-batch per process")
    ap.add_argument("--accumulation_steps", type=int, default=1, help="micro-batches (rollout batches) per step")
    ap.add_argument("--max_gen_len", type=int, default=128, help="most new tokens per completion (128 suits a CPU)")
    ap.add_argument("--beta", type=float, default=0.1, help="KL weight; 0 loads no reference model (no reference "
                    "time)")
    ap.add_argument("--loss_type", default="cispo", help="any registered loss type (the grpo command checks it)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="fp32 on a CPU; bf16 on a GPU")
    ap.add_argument("--hidden_size", type=int, help="override minimind2-small's width")
    ap.add_argument("--num_hidden_layers", type=int, help="override minimind2-small's depth")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the training run")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "sft_zh_alpaca_demo.jsonl",
                    help="conversations whose first user turns are the prompts (else the bundled demo SFT file)")
    ap.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "minimind",
                    help="tokenizer directory (else the package's own)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "grpo_throughput.json")
    args = ap.parse_args()
    if args.warmup < 0 or args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup (the warm-up steps are not timed)")

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        policy, params, tokenizer_used = write_policy(args, work)
        prompts, n_prompts, data_used = write_prompts(args, work)
        print(f"running grpo: {params / 1e6:.1f}M-parameter policy, {n_prompts} prompts, {args.steps} steps ...",
              flush=True)
        metrics, wall = run_grpo(args, policy, prompts, work)
    rows = step_rows(metrics, args)
    if not rows:
        sys.exit(f"metrics.jsonl has no step after the {args.warmup} warm-up step(s)")
    med = medians(rows)

    shape = f"hidden {args.hidden_size or 'preset'}, {args.num_hidden_layers or 'preset'} layers"
    print(f"\ngrpo ({args.loss_type}, beta {args.beta}), minimind2-small shape ({shape}, {params / 1e6:.1f}M "
          f"parameters), {args.batch_size} prompts x {args.num_generations} generations x "
          f"{args.accumulation_steps} accumulation x {rows[0]['world_size']} process(es), max_gen_len "
          f"{args.max_gen_len}, {args.dtype}, {device}, OMP_NUM_THREADS={args.threads}; median of steps "
          f"{rows[0]['step']}-{rows[-1]['step']} ({args.warmup} warm-up step(s) left out); whole command "
          f"{wall:.0f}s\n")
    cols = ["step s", "generation s (share)", "reward s", "reference s", "update s", "rollout tokens/s",
            "mean completion length"]
    share = "—" if med["generation_share"] is None else f"{100 * med['generation_share']:.0f}%"
    cells = [_fmt(med["step_sec"], 2), f"{_fmt(med['generation_sec'], 2)} ({share})", _fmt(med["reward_sec"], 3),
             _fmt(med["reference_sec"], 2), _fmt(med["update_sec"], 2), _fmt(med["rollout_tokens_per_sec"], 1),
             _fmt(med["completion_length"], 1)]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    print("| " + " | ".join(cells) + " |")
    clipped = [r["completion_clipped_ratio"] for r in rows if r["completion_clipped_ratio"] is not None]
    if clipped:
        print(f"\ncompletions cut at max_gen_len: {100 * statistics.mean(clipped):.0f}% (a random-init policy "
              "rarely ends its turn)")

    settings = {k: _portable(v) for k, v in vars(args).items() if k != "out"}
    settings.update(model="minimind2-small", parameters=params, tokenizer_used=tokenizer_used, data_used=data_used,
                    prompts=n_prompts, reward_funcs=["minimind_format"], device=device,
                    command_wall_sec=wall)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": settings, "steps": rows, "medians": med}, indent=1))


if __name__ == "__main__":
    main()
