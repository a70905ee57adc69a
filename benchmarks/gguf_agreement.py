"""GGUF export in llama.cpp: how closely each --gguf_type reproduces transformers, on a model wide enough for
llama.cpp's k-quants (rows of 256).

    python benchmarks/gguf_agreement.py              # writes benchmarks/results/gguf_agreement.json

1. `full_sft` trains a dense and an MoE model (hidden 256, 4 layers, MiniMind's tokenizer) on 32 shared
   conversations (16 English, 16 Chinese) until it reproduces them with peaked next-token distributions.
2. `export --format gguf` writes every type; llama.cpp (llama-cpp-python) runs each file.
3. For the 20 trained prompts: how many 32-token greedy continuations equal transformers', and the mean
   |log-prob gap| of transformers' continuation tokens teacher-forced through llama.cpp. File sizes too.

The suite checks the same on hidden-64 models (tests/e2e/test_gguf.py), where k-quant rows fall back to
smaller block types. Uses ../shared beside the checkout; CPU, fp32, one process.
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
sys.path.insert(0, str(REPO / "tests" / "e2e"))  # the suite's own llama.cpp / transformers comparison

from gguf_helpers import (  # noqa: E402
    agreement,
    close_all,
    greedy_prompts,
    hf_reference,
    llama,
    write_training_conversations,
)

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
PRESETS = {"dense": "tiny", "moe": "minimind3-moe"}


def cli(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "minimind_scale", *args], check=True, env=env, cwd=REPO,
                   stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=str(RESULTS / "gguf_agreement.json"))
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="gguf_agreement_"))
    data = write_training_conversations(work / "conversations.jsonl")
    rows = []
    for kind, preset in PRESETS.items():
        run = work / kind
        started = time.time()
        cli("full_sft", "--model", preset, "--hidden_size", str(args.hidden_size), "--num_hidden_layers",
            str(args.layers), "--tokenizer", str(SHARED / "tokenizers" / "minimind"), "--data_path", str(data),
            "--out_dir", str(run), "--max_steps", str(args.steps), "--batch_size", "4", "--max_seq_len", "128",
            "--packing", "false", "--learning_rate", "5e-3", "--warmup_steps", "10", "--min_lr_ratio", "0.1",
            "--dtype", "fp32", "--num_proc", "1", "--seed", "0", "--save_interval", "0")
        print(f"{kind}: trained in {time.time() - started:.0f} s", flush=True)
        model = AutoModelForCausalLM.from_pretrained(run / "final").eval()
        tokenizer = AutoTokenizer.from_pretrained(run / "final")
        reference_prompts = greedy_prompts(tokenizer)
        reference = hf_reference(model, reference_prompts, 32)
        for gguf_type in TYPES:
            out = work / f"{kind}-{gguf_type}" / "model.gguf"
            out.parent.mkdir()
            cli("export", "--model", str(run / "final"), "--format", "gguf", "--out_file", str(out),
                "--gguf_type", gguf_type)
            row = {"model": kind, "gguf_type": gguf_type, "bytes": out.stat().st_size,
                   **agreement(reference, llama(out), reference_prompts)}
            rows.append(row)
            print(f"  {gguf_type:6} {row['agree']:2}/{row['prompts']}  gap {row['mean_logprob_gap']:.5f}  "
                  f"{row['bytes'] / 2**20:.2f} MiB", flush=True)
            close_all()
    result = {"hidden_size": args.hidden_size, "layers": args.layers, "steps": args.steps,
              "prompts": 20, "new_tokens": 32, "rows": rows,
              "parameters": {kind: sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(
                  work / kind / "final").parameters()) for kind in PRESETS}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
