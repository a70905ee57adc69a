"""The engine's rollout seam: a stage that produces its own micro-batches trains exactly as the offline stage."""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import DEMO, REPO, read_metrics, run_cli

PLUGIN = REPO / "tests" / "plugins" / "resplit_stage.py"


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("seam") / "sft"
    run_cli(["full_sft", *common(out)], data_cache)
    return read_metrics(out)


def common(out) -> list[str]:
    return ["--model", "tiny", "--data_path", str(DEMO / "sft.jsonl"), "--out_dir", str(out), "--max_steps", "4",
            "--batch_size", "4", "--max_seq_len", "96", "--packing", "false", "--learning_rate", "3e-3",
            "--log_interval", "1", "--save_interval", "2", "--dtype", "fp32", "--num_proc", "1", "--seed", "5"]


def test_rollout_micro_batches_give_the_offline_losses(tmp_path, data_cache, sft_run):
    out = tmp_path / "resplit"
    run_cli(["--plugin", str(PLUGIN), "resplit", *common(out)], data_cache)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for mine, offline in zip(rows, sft_run):
        assert mine["tokens"] == offline["tokens"]
        assert mine["loss"] == pytest.approx(offline["loss"], abs=1e-5)
    state = torch.load(out / "checkpoints" / "step_2" / "stage_state_0.pt", weights_only=False)
    assert state == {"rollouts": 2}

    # Resumed from step 2, the stage state comes back from the checkpoint and keeps counting.
    shutil.rmtree(out / "checkpoints" / "step_4")
    shutil.rmtree(out / "final")
    run_cli(["--plugin", str(PLUGIN), "resplit", *common(out)], data_cache)
    again = read_metrics(out)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for mine, offline in zip(again[2:], sft_run[2:]):
        assert mine["loss"] == pytest.approx(offline["loss"], abs=1e-5)
    assert torch.load(out / "checkpoints" / "step_4" / "stage_state_0.pt", weights_only=False) == {"rollouts": 4}
