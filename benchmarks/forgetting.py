"""Forgetting and replay: does mixing pretraining text into SFT keep what pretraining taught?

    python benchmarks/forgetting.py                      # writes benchmarks/results/forgetting.{json,png}

1. Pretrain a small model on English web text, holding out a tenth of it (never trained on by anyone).
2. Fine-tune it on English instructions twice, for the same steps: SFT alone, and SFT with 10% replay of the
   pretraining text (`--data_path sft.jsonl text.jsonl --data_weights 0.9 0.1`). Both runs watch the same held-out
   sets during training: `val` (a share of the SFT records) and `web` (the held-out text).
3. Report the held-out text's perplexity before SFT (`eval` on the pretrained model) and after each SFT run, and
   each run's SFT validation loss, from the runs' own metrics.jsonl; `plot` draws both runs' curves.

Uses the shared data beside the checkout (../shared/data); CPU, fp32, one process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESULTS = REPO / "benchmarks" / "results"


def cli(*args: str, capture: bool = False) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "minimind_scale", *args], check=True, env=env, cwd=REPO, text=True,
                          stdout=subprocess.PIPE if capture else subprocess.DEVNULL)
    return done.stdout if capture else ""


def split_text(source: Path, work: Path, held_out_share: float) -> tuple[Path, Path]:
    """The text file cut into a training part and a held-out part (every k-th record), as files."""
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    every = round(1 / held_out_share)
    train, held = work / "web_train.jsonl", work / "web_heldout.jsonl"
    train.write_text("".join(line + "\n" for i, line in enumerate(lines) if i % every))
    held.write_text("".join(line + "\n" for i, line in enumerate(lines) if not i % every))
    return train, held


def eval_rows(out_dir: Path) -> list[dict]:
    return [row for row in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
            if any(k.startswith("eval/") for k in row)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--pretrain_epochs", type=int, default=3)
    parser.add_argument("--sft_steps", type=int, default=200)
    parser.add_argument("--replay", type=float, default=0.1, help="share of pretraining records in the SFT mix")
    parser.add_argument("--max_seq_len", type=int, default=256)
    parser.add_argument("--out", default=str(RESULTS / "forgetting"), help="where the .json and .png go")
    args = parser.parse_args()
    data = SHARED / "data"
    work = Path(tempfile.mkdtemp(prefix="forgetting-"))
    started = time.time()
    web_train, web_held = split_text(data / "pretrain_en_c4wiki.jsonl", work, 0.1)
    sft = data / "sft_en_alpaca_demo.jsonl"
    common = ["--tokenizer", str(SHARED / "tokenizers" / "minimind"), "--max_seq_len", str(args.max_seq_len),
              "--dtype", "fp32", "--seed", "7", "--cache_dir", str(work / "cache"), "--save_interval", "0",
              "--num_proc", "2"]
    cli("pretrain", "--data_path", str(web_train), "--out_dir", str(work / "pretrain"), "--model", "minimind2-small",
        "--hidden_size", str(args.hidden_size), "--num_hidden_layers", str(args.layers), "--batch_size", "16",
        "--accumulation_steps", "1", "--epochs", str(args.pretrain_epochs), "--learning_rate", "2e-3", *common)
    before = json.loads(cli("eval", "--model", str(work / "pretrain" / "final"), "--data_path", str(web_held),
                            "--max_seq_len", str(args.max_seq_len), "--cache_dir", str(work / "cache"),
                            capture=True).strip().splitlines()[-1])
    sft_common = ["--model", str(work / "pretrain" / "final"), "--max_steps", str(args.sft_steps), "--batch_size", "8",
                  "--learning_rate", "5e-4", "--val_size", "0.05", "--eval_data_path", f"web={web_held}",
                  "--eval_interval", str(max(1, args.sft_steps // 10)), "--log_interval", "5", *common]
    runs = {"sft": ["--data_path", str(sft)],
            "sft_replay": ["--data_path", str(sft), str(web_train),
                           "--data_weights", str(1 - args.replay), str(args.replay)]}
    for name, data_args in runs.items():
        cli("full_sft", *data_args, "--out_dir", str(work / name), *sft_common)
    result = {"pretrained_web_ppl": before["ppl"], "replay_share": args.replay, "sft_steps": args.sft_steps,
              "model": f"hidden {args.hidden_size}, {args.layers} layers", "seconds": round(time.time() - started)}
    for name in runs:
        last = eval_rows(work / name)[-1]
        result[name] = {"web_ppl": last["eval/web/ppl"], "val_loss": last["eval/val/loss"]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    cli("plot", "--out_dir", str(work / "sft"), str(work / "sft_replay"), "--save", str(out.with_suffix(".png")))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
