"""GRPO end to end on a tiny model: it learns from a user's reward file, its first KL is 0, it runs on 2 processes
under DDP and under DeepSpeed ZeRO-3 with a reward model, and a kill -9 resume gives the uninterrupted run's losses
and rewards."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, cli_env, read_metrics, run_cli

REWARDS = '''
def digit_share(prompts, completions, completion_ids, **columns):
    """The share of the completion's characters that are digits: a random tiny model writes few."""
    return [sum(ch.isdigit() for ch in c[0]["content"]) / max(1, len(c[0]["content"])) for c in completions]
'''


@pytest.fixture(scope="module")
def grpo_files(tmp_path_factory) -> dict[str, Path]:
    """A start policy (the tiny preset, saved), a reward model on its backbone, prompts and a reward file."""
    from transformers import AutoModelForSequenceClassification

    from minimind_scale.models.build import build_model, load_tokenizer, save_hf

    root = tmp_path_factory.mktemp("grpo")
    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    save_hf(build_model("tiny", tokenizer), tokenizer, root / "start")
    rm = AutoModelForSequenceClassification.from_pretrained(root / "start", num_labels=1)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(32):  # MiniMind's rlaif layout: the conversation ends with a placeholder assistant turn
            f.write(json.dumps({"conversations": [{"role": "user", "content": f"Say something about {i}."},
                                                  {"role": "assistant", "content": ""}], "gt": [str(i)]}) + "\n")
    (root / "rewards.py").write_text(REWARDS)
    return {"start": root / "start", "rm": root / "rm", "prompts": root / "prompts.jsonl",
            "rewards": root / "rewards.py"}


def grpo_args(files, out: Path, steps: int, *extra: str) -> list[str]:
    return ["grpo", "--model", str(files["start"]), "--data_path", str(files["prompts"]), "--out_dir", str(out),
            "--reward_funcs", f"{files['rewards']}:digit_share", "--num_generations", "4", "--batch_size", "4",
            "--max_gen_len", "16", "--max_prompt_len", "32", "--learning_rate", "1e-2", "--max_steps", str(steps),
            "--log_interval", "1", "--dtype", "fp32", "--num_proc", "1", "--temperature", "1.0", "--top_p", "1.0",
            "--top_k", "0", "--seed", "3", *extra]


def test_grpo_raises_the_reward_of_a_user_reward_function(tmp_path, data_cache, grpo_files):
    out = tmp_path / "run"
    run_cli(grpo_args(grpo_files, out, 30, "--save_interval", "0", "--log_completions", "2"), data_cache)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    first, last = (sum(r["reward"] for r in part) / 5 for part in (rows[:5], rows[-5:]))
    assert last > 3 * first and last > first + 0.05, (first, last)
    for key in ("reward_std", "rewards/digit_share", "clip_ratio", "completion_length", "completion_clipped_ratio",
                "frac_reward_zero_std", "advantage_std"):
        assert key in rows[-1], key
    logged = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 60 and {"step", "prompt", "completion", "reward"} <= set(logged[0])


def kill_after_checkpoint(cmd: list[str], out: Path, step: int, data_cache: Path) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=cli_env(data_cache, MINIMIND_SCALE_TEST_STEP_DELAY="0.5"))
    marker = out / "checkpoints" / f"step_{step}" / "trainer_state.json"
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, f"no step-{step} checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists()


@pytest.mark.parametrize("nproc", [1, 2])
def test_grpo_resume_after_kill_9_matches_an_uninterrupted_run(nproc, tmp_path, data_cache, grpo_files):
    """Sampling draws from each process's RNG, which the checkpoint restores: the resumed run samples the same
    completions, so its rewards and losses are the uninterrupted run's. On 2 processes (DDP) with a reward model."""
    extra = ["--reward_model", str(grpo_files["rm"]), "--reward_weights", "1.0", "0.5"] if nproc == 2 else []
    args = lambda out: grpo_args(grpo_files, out, 4, "--save_interval", "2", "--batch_size", "2",  # noqa: E731
                                 "--accumulation_steps", "2", "--num_iterations", "2", "--loss_type", "grpo", *extra)
    run_cli(args(tmp_path / "full"), data_cache, nproc=nproc)
    out = tmp_path / "killed"
    launcher = [sys.executable, "-m", "minimind_scale"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "minimind_scale"]
    kill_after_checkpoint([*launcher, *args(out)], out, 2, data_cache)
    run_cli(args(out), data_cache, nproc=nproc)
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(out)
    assert [r["step"] for r in resumed] == list(range(1, 5)) and resumed[0]["world_size"] == nproc
    if nproc == 2:
        assert all(abs(r["rewards/reward_model"]) <= 3.0 for r in resumed)
    for a, b in zip(full, resumed):
        for key in ("loss", "reward", "kl", "completion_length"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_grpo_under_zero3_through_the_deepspeed_launcher_with_a_reward_model(tmp_path, data_cache, grpo_files):
    """2 processes; 2-process DDP runs in the resume test above."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "zero3"
    args = grpo_args(grpo_files, out, 3, "--reward_model", str(grpo_files["rm"]), "--reward_weights", "1.0", "0.5",
                     "--save_interval", "2")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "minimind_scale", *args, "--deepspeed", str(REPO / "ds_configs" / "zero3.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=cli_env(data_cache))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["world_size"] == 2
    assert all(abs(r["rewards/reward_model"]) <= 3.0 for r in rows)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert AutoModelForCausalLM.from_pretrained(out / "final").num_parameters() > 0
