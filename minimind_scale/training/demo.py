"""`python -m minimind_scale demo`: tokenizer -> pretrain -> SFT on the bundled demo data, then answers.

Each step runs the same public command a user would type (printed before it runs), in its own
process, so the demo doubles as a walkthrough of the command line.
"""
from __future__ import annotations

import contextlib
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from minimind_scale.config import StrictConfig
from minimind_scale.errors import UserError

DEMO_DATA = Path(__file__).parents[1] / "assets" / "demo"


class DemoConfig(StrictConfig):
    """Train a ~1M-parameter model from nothing on the bundled demo data (under 3 minutes on 2 idle CPU cores).

    fp32 by default: bf16 autocast measured no faster on this model's small matrices on an AVX512-BF16 CPU."""

    out_dir: str = Field("out/demo", description="where the tokenizer, the two runs and their models go")
    hidden_size: int = Field(128, ge=8, description="model width")
    num_hidden_layers: int = Field(4, ge=1, description="model depth")
    pretrain_steps: int = Field(150, ge=1, description="pretraining optimizer steps")
    sft_steps: int = Field(250, ge=1, description="SFT optimizer steps")
    batch_size: int = Field(32, ge=1, description="rows per step")
    vocab_size: int = Field(1024, ge=300, description="tokenizer vocabulary size")
    num_proc: int = Field(1, ge=1, description="tokenisation workers (the demo data is small)")
    dtype: Literal["fp32", "bf16", "auto"] = Field("fp32", description="training precision of both runs")


def _run(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "minimind_scale", *args]
    print(f"\n$ python -m minimind_scale {shlex.join(args)}", flush=True)
    started = time.time()
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise UserError(f"demo step failed (exit {result.returncode}): python -m minimind_scale {shlex.join(args)}")
    print(f"({args[0]} took {time.time() - started:.1f}s)", flush=True)


def run(cfg: DemoConfig) -> None:
    from minimind_scale.data.demo_data import DEMO_ANSWERS, DEMO_PROMPTS

    out = Path(cfg.out_dir)
    pretrain_data, sft_data = DEMO_DATA / "pretrain.jsonl", DEMO_DATA / "sft.jsonl"
    started = time.time()
    shape = ["--hidden_size", str(cfg.hidden_size), "--num_hidden_layers", str(cfg.num_hidden_layers)]
    common = ["--batch_size", str(cfg.batch_size), "--max_seq_len", "128", "--dtype", cfg.dtype,
              "--num_proc", str(cfg.num_proc), "--log_interval", "25", "--resume", "never"]
    _run(["train-tokenizer", "--data_path", str(pretrain_data), str(sft_data), "--vocab_size", str(cfg.vocab_size),
          "--out_dir", str(out / "tokenizer")])
    _run(["pretrain", "--model", "tiny", "--tokenizer", str(out / "tokenizer"), "--data_path", str(pretrain_data),
          "--out_dir", str(out / "pretrain"), "--max_steps", str(cfg.pretrain_steps), "--accumulation_steps", "1",
          "--learning_rate", "3e-3", "--warmup_steps", "20", *shape, *common])
    _run(["sft", "--model", str(out / "pretrain" / "final"), "--data_path", str(sft_data),
          "--out_dir", str(out / "sft"), "--max_steps", str(cfg.sft_steps), "--learning_rate", "1e-3", *common])
    right = show_answers(out / "sft" / "final", DEMO_PROMPTS, DEMO_ANSWERS)
    print(f"{right} of {len(DEMO_PROMPTS)} answers hold the expected word "
          f"({', '.join(DEMO_ANSWERS)}).\ndemo finished in {time.time() - started:.0f}s. Talk to the model: "
          f"python -m minimind_scale chat --model {out / 'sft' / 'final'}")


def show_answers(model_dir: Path, prompts: list[str], expected: list[str]) -> int:
    """Print the model's greedy answer to each prompt; return how many contain their expected word."""
    from minimind_scale.generation.registry import DEFAULT_BACKEND, load_backend
    from minimind_scale.inference.chat import answer

    # fp32 on the CPU, as the demo has always answered: a model of ~1M parameters gains nothing from a GPU.
    generator, tokenizer = load_backend(DEFAULT_BACKEND, str(model_dir), dtype="fp32", device="cpu")
    print()
    right = 0
    with contextlib.closing(generator):
        for prompt, word in zip(prompts, expected):
            reply = answer(generator, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens=40,
                           temperature=0.0)
            right += word in reply
            print(f"user:      {prompt}\nassistant: {reply.strip()}\n")
    return right
