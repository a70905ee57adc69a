"""The first optimizer steps' losses of sft, dpo, grpo and ppo on a fixed seed, as JSON: a fingerprint of the numbers.

A refactor that must not change behaviour runs this before and after and compares (fp32 on CPU, 1e-6):

    python benchmarks/first_losses.py --steps 5 > before.json   # on the old code
    python benchmarks/first_losses.py --steps 5 --compare before.json

Tiny preset models from a fixed seed, the shared real data when it sits beside the checkout (else the packaged demo
data), one process, no data cache reuse between runs.
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
SHARED = REPO.parent / "shared" / "data"
DEMO = REPO / "minimind_scale" / "assets" / "demo"
REWARDS = '''
def digit_share(prompts, completions, **columns):
    texts = [c[0]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in texts]
'''


def stage_args(root: Path, steps: int) -> dict[str, list[str]]:
    sft = SHARED / "sft_identity.jsonl" if SHARED.exists() else DEMO / "sft.jsonl"
    dpo = SHARED / "dpo_en_demo.jsonl"
    common = ["--model", str(root / "start"), "--max_steps", str(steps), "--log_interval", "1", "--dtype", "fp32",
              "--num_proc", "1", "--seed", "7", "--save_interval", "0"]
    online = ["--data_path", str(root / "prompts.jsonl"), "--reward_funcs", f"{root / 'rewards.py'}:digit_share",
              "--batch_size", "2", "--max_gen_len", "16", "--max_prompt_len", "32",
              "--temperature", "1.0", "--top_p", "1.0", "--top_k", "0", "--learning_rate", "1e-3"]
    return {
        "sft": ["sft", "--data_path", str(sft), "--batch_size", "4", "--max_seq_len", "128",
                "--learning_rate", "1e-3"],
        "dpo": ["dpo", "--data_path", str(dpo), "--batch_size", "2", "--max_seq_len", "128", "--learning_rate", "1e-4"],
        "grpo": ["grpo", *online, "--num_generations", "4", "--beta", "0.1", "--num_iterations", "2",
                 "--loss_type", "grpo"],
        "ppo": ["ppo", *online],
    }, common


def make_inputs(root: Path) -> None:
    import torch

    from minimind_scale.models import build_model, load_tokenizer, save_hf

    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    save_hf(build_model("tiny", tokenizer), tokenizer, root / "start")
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"conversations": [{"role": "user", "content": f"Count to {i}."},
                                                  {"role": "assistant", "content": ""}]}) + "\n")
    (root / "rewards.py").write_text(REWARDS)


def losses(steps: int) -> dict[str, list[float]]:
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_inputs(root)
        stages, common = stage_args(root, steps)
        env = {**os.environ, "MINIMIND_SCALE_CACHE": str(root / "cache"), "HF_DATASETS_CACHE": str(root / "hf"),
               "OMP_NUM_THREADS": "1"}
        for name, args in stages.items():
            out = root / name
            subprocess.run([sys.executable, "-m", "minimind_scale", *args, *common, "--out_dir", str(out)],
                           check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            found[name] = [row["loss"] for row in rows if "loss" in row][:steps]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compare", help="a JSON file this script wrote before; exit 1 on any difference over --tol")
    parser.add_argument("--tol", type=float, default=1e-6)
    args = parser.parse_args()
    found = losses(args.steps)
    print(json.dumps(found))
    if args.compare:
        before = json.loads(Path(args.compare).read_text().splitlines()[-1])  # the JSON is the last line
        worst = max(abs(a - b) for k in before for a, b in zip(before[k], found[k], strict=True))
        print(f"largest difference: {worst:.3g}", file=sys.stderr)
        sys.exit(0 if worst <= args.tol else 1)


if __name__ == "__main__":
    main()
