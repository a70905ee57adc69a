"""PPO end to end on a tiny model: it learns from a user's reward file, final/ and final/critic/ load with the
Auto classes, a kill -9 resume on 2 processes (DDP) gives the uninterrupted run's numbers (and its checkpoint
exports to the same policy and a critic), and under ZeRO-3 the
target-KL early stop skips the same updates on every process."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_grpo import free_port, grpo_files, kill_after_checkpoint  # noqa: F401  (grpo_files is a fixture)

from conftest import REPO, cli_env, read_metrics, run_cli


def ppo_args(files, out, steps: int, *extra: str) -> list[str]:
    return ["ppo", "--model", str(files["start"]), "--data_path", str(files["prompts"]), "--out_dir", str(out),
            "--reward_funcs", f"{files['rewards']}:digit_share", "--batch_size", "8", "--max_gen_len", "16",
            "--max_prompt_len", "32", "--learning_rate", "1e-2", "--critic_learning_rate", "1e-2",
            "--max_steps", str(steps), "--log_interval", "1", "--dtype", "fp32", "--num_proc", "1",
            "--temperature", "1.0", "--top_p", "1.0", "--top_k", "0", "--seed", "3", *extra]


def test_ppo_raises_the_reward_of_a_user_reward_function(tmp_path, data_cache, grpo_files):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    out = tmp_path / "run"
    run_cli(ppo_args(grpo_files, out, 30, "--save_interval", "0", "--log_completions", "1"), data_cache)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[0]["approx_kl"] == pytest.approx(0.0, abs=1e-9)
    first, last = (sum(r["reward"] for r in part) / 6 for part in (rows[:6], rows[-6:]))
    assert last > 2 * first and last > first + 0.02, (first, last)
    for key in ("reward", "kl", "approx_kl", "clipfrac", "value_loss", "policy_loss", "value_mean",
                "completion_length", "ppo_epochs_run"):
        assert key in rows[-1], key
    assert [r["ppo_epochs_run"] for r in rows[:4]] == [1.0, 2.0, 1.0, 2.0]  # one update per epoch, two epochs
    assert len((out / "completions.jsonl").read_text().splitlines()) == 15  # one row per rollout of 2 steps
    assert AutoModelForCausalLM.from_pretrained(out / "final").num_parameters() > 0
    critic = AutoModelForTokenClassification.from_pretrained(out / "final" / "critic")
    assert critic.config.num_labels == 1 and type(critic).__name__ == "Qwen3ForTokenClassification"


def test_ppo_resume_after_kill_9_on_2_processes_matches_an_uninterrupted_run(tmp_path, data_cache,
                                                                             grpo_files):  # noqa: F811
    """Both models and the optimizer state of both are in the checkpoint, with the sampling RNG and the
    rollout count that seeds the mini-batch shuffle: the resumed run's numbers are the uninterrupted run's."""
    args = lambda out: ppo_args(grpo_files, out, 8, "--save_interval", "4", "--batch_size", "2",  # noqa: E731
                                "--accumulation_steps", "2", "--mini_batch_size", "2", "--kl_in_reward")
    run_cli(args(tmp_path / "full"), data_cache, nproc=2)
    out = tmp_path / "killed"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "minimind_scale"]
    kill_after_checkpoint([*launcher, *args(out)], out, 4, data_cache)
    run_cli(args(out), data_cache, nproc=2)
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(out)
    assert [r["step"] for r in resumed] == list(range(1, 9)) and resumed[0]["world_size"] == 2
    for a, b in zip(full, resumed):
        for key in ("loss", "reward", "value_loss", "approx_kl", "kl", "completion_length"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)

    # export turns a ppo checkpoint into the policy and its critic, as final/ holds them
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    run_cli(["export", "--checkpoint", str(out / "checkpoints" / "step_8"), "--out_dir", str(tmp_path / "exported")],
            data_cache)
    final_policy = AutoModelForCausalLM.from_pretrained(out / "final")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    for (name, a), b in zip(final_policy.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(a, b), name
    assert AutoModelForTokenClassification.from_pretrained(tmp_path / "exported" / "critic").config.num_labels == 1


def test_ppo_under_zero3_stops_early_on_every_process_together(tmp_path, data_cache, grpo_files):  # noqa: F811
    """With a tiny target_kl every rollout's second update measures more KL than allowed: the third is skipped
    on both processes (a rank that went on alone would leave the other waiting in a collective)."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    out = tmp_path / "zero3"
    args = ppo_args(grpo_files, out, 6, "--batch_size", "2", "--ppo_epochs", "3", "--target_kl", "1e-12",
                    "--save_interval", "3")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "minimind_scale", *args, "--deepspeed", str(REPO / "ds_configs" / "zero3.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=cli_env(data_cache))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 4, 5] and rows[0]["world_size"] == 2
    assert [r["ppo_epochs_run"] for r in rows] == [1.0, 2.0, 1.0, 2.0]
    assert all(r["approx_kl"] > 1e-12 for r in (rows[1], rows[3]))
    assert json.loads((out / "checkpoints" / "step_6" / "trainer_state.json").read_text())["step"] == 6
    assert AutoModelForCausalLM.from_pretrained(out / "final").num_parameters() > 0
    assert AutoModelForTokenClassification.from_pretrained(out / "final" / "critic").config.num_labels == 1
