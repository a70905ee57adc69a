"""Policy loss types are registered: a new one is one decorated function, grpo trains with it end to end, its
registered upper clip is the config's default, and --loss_type refuses a name nobody registered."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import cli_output_in_process, read_metrics, run_cli
from minimind_scale.losses.policy import POLICY_LOSSES, TokenLoss, register_policy_loss

BUILT_IN = ("cispo", "grpo", "dapo", "dr_grpo")

# A plugin file: plain REINFORCE (−A·logπ per token, no ratio, no clip) averaged over the step's tokens. Each
# call appends the objective's summed loss to the file REINFORCE_CALLS names, so the test sees it ran.
REINFORCE_PLUGIN = '''
import os

import torch

from minimind_scale import TokenLoss, register_policy_loss


@register_policy_loss("reinforce", aggregation="token_mean")
def reinforce(ratio, advantages, logps, *, epsilon, epsilon_high):
    loss = -advantages * logps
    with open(os.environ["REINFORCE_CALLS"], "a") as f:
        f.write(f"{float(loss.detach().sum())}\\n")
    never = torch.zeros_like(loss, dtype=torch.bool)
    return TokenLoss(loss, never, never)
'''

REWARD = '''
def length(prompts, completions, completion_ids, **columns):
    return [len(ids) / 8 for ids in completion_ids]
'''


def grpo_args(root, *extra: str) -> list[str]:
    return ["grpo", "--model", "tiny", "--data_path", str(root / "prompts.jsonl"), "--out_dir", str(root / "run"),
            "--reward_funcs", f"{root / 'rewards.py'}:length", "--num_generations", "2", "--batch_size", "2",
            "--max_gen_len", "8", "--max_prompt_len", "32", "--beta", "0", "--max_steps", "3", "--log_interval", "1",
            "--save_interval", "0", "--dtype", "fp32", "--num_proc", "1", "--temperature", "1.0", "--top_k", "0",
            "--seed", "0", *extra]


def test_a_loss_type_registered_by_a_plugin_trains_grpo(tmp_path, data_cache):
    plugin, calls = tmp_path / "reinforce_loss.py", tmp_path / "calls.txt"
    plugin.write_text(REINFORCE_PLUGIN)
    (tmp_path / "rewards.py").write_text(REWARD)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"count to {i}"}) + "\n" for i in range(6)))
    run_cli(["--plugin", str(plugin), *grpo_args(tmp_path, "--loss_type", "reinforce")], data_cache,
            REINFORCE_CALLS=str(calls))
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[-1]["clip_ratio"] == 0.0  # the objective never clips
    # The registered objective computed every loss: one call per micro-batch, 3 steps of one micro-batch each.
    sums = [float(line) for line in calls.read_text().split()]
    assert len(sums) == 3 and all(torch.isfinite(torch.tensor(sums)))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["loss_type"] == "reinforce" and saved["plugin"] == [str(plugin)]


def sign_flipped(ratio, advantages, logps, *, epsilon, epsilon_high) -> TokenLoss:
    never = torch.zeros_like(ratio, dtype=torch.bool)
    return TokenLoss(ratio * advantages, never, never)


@pytest.fixture
def flipped_registered():
    """`sign_flipped` registered in this process as loss type "flipped", with an upper clip of its own."""
    register_policy_loss("flipped", aggregation="completion_mean", clip_high=0.5)(sign_flipped)
    yield "flipped"
    POLICY_LOSSES.pop("flipped")


def test_the_registered_clip_is_the_default_and_an_unregistered_name_is_refused(flipped_registered, tmp_path,
                                                                                 capsys):
    from minimind_scale.rl.config import GRPOFamilyConfig

    common = {"model": "tiny", "data_path": ["unused.jsonl"], "reward_funcs": ["accuracy"]}
    assert GRPOFamilyConfig(**common, loss_type="flipped").clip_high == 0.5
    assert GRPOFamilyConfig(**common, loss_type="flipped", epsilon_high=0.3).clip_high == 0.3
    assert GRPOFamilyConfig(**common, loss_type="dapo", epsilon=0.25).clip_high == 0.25
    assert GRPOFamilyConfig(**common).clip_high == 5.0  # cispo's cap

    code, _, err = cli_output_in_process(["grpo", "--model", "tiny", "--data_path", str(tmp_path / "p.jsonl"),
                                          "--reward_funcs", "accuracy", "--loss_type", "no_such_loss"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "no_such_loss" in err
    for name in (*BUILT_IN, "flipped"):
        assert name in err, (name, err)

    code, out, _ = cli_output_in_process(["grpo", "--help"], capsys)
    help_line = next(line for line in out.splitlines() if line.strip().startswith("--loss_type"))
    assert code == 0 and all(name in help_line for name in BUILT_IN)
