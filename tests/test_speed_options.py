"""The throughput options change speed and memory, never the numbers: gradient checkpointing, loader
workers and torch.compile give the losses and gradients of the plain run."""
from __future__ import annotations

import pytest
import torch

from conftest import DEMO, read_metrics, run_cli
from minimind_scale.data.batching import pad_collate, padded_length
from minimind_scale.losses.causal_lm import causal_lm_loss
from minimind_scale.models.build import build_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SFT = ["sft", "--model", "tiny", "--hidden_size", "32", "--num_hidden_layers", "2", "--data_path",
       str(DEMO / "sft.jsonl"), "--max_steps", "3", "--batch_size", "4", "--max_seq_len", "128", "--packing", "true",
       "--dtype", "fp32", "--log_interval", "1", "--save_interval", "0", "--num_proc", "1", "--learning_rate", "3e-3",
       "--seed", "5"]


def test_checkpointing_and_loader_workers_train_the_same(tmp_path, data_cache):
    run_cli([*SFT, "--out_dir", str(tmp_path / "plain")], data_cache)
    run_cli([*SFT, "--gradient_checkpointing", "true", "--dataloader_workers", "2",
             "--out_dir", str(tmp_path / "fast")], data_cache)
    plain, fast = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "fast")
    assert len(plain) == len(fast) == 3
    for a, b in zip(plain, fast):
        assert b["tokens"] == a["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # The losses move: equal numbers come from training, not from a run that did nothing.
    assert plain[-1]["loss"] != plain[0]["loss"]


def test_compiled_model_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = build_model("tiny", load_tokenizer(None), hidden_size=32, num_hidden_layers=1)
    # Two packed rows (a second sample restarts at position 0 in the first), padded as under compile.
    ids = [list(range(5, 45)), list(range(7, 37))]
    rows = [{"input_ids": ids[0], "labels": ids[0], "position_ids": list(range(18)) + list(range(22))},
            {"input_ids": ids[1], "labels": ids[1], "position_ids": list(range(30))}]
    batch = pad_collate(rows, 0, length=48)

    def loss_and_grads(m):
        model.zero_grad()
        loss = causal_lm_loss(m, batch).loss_sum
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    plain_loss, plain_grads = loss_and_grads(model)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model))
    torch.testing.assert_close(compiled_loss, plain_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_packed_rows_under_compile_have_one_shape():
    from minimind_scale.training.registry import discover, get_stage

    discover()
    cfg = get_stage("sft").config(max_seq_len=96, packing=True, compile=True)
    assert padded_length(cfg) == 96
    assert padded_length(cfg.model_copy(update={"compile": False})) is None
    assert padded_length(cfg.model_copy(update={"packing": False})) is None
