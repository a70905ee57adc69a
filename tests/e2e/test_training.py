"""End-to-end runs of the real command line: loss normalisation, resume, cache reuse, outputs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_env, read_metrics, run_cli

TINY = ["--model", "tiny", "--max_seq_len", "96", "--dtype", "fp32", "--log_interval", "1", "--num_proc", "1",
        "--learning_rate", "3e-3", "--seed", "7"]


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / "final" / "model.safetensors"))


def assert_same_run(a: Path, b: Path, tol: float = 1e-5, weight_tol: float = 1e-5) -> None:
    la = [r["loss"] for r in read_metrics(a) if "loss" in r]  # training rows (evaluation rows have none)
    lb = [r["loss"] for r in read_metrics(b) if "loss" in r]
    assert len(la) == len(lb)
    for step, (x, y) in enumerate(zip(la, lb), start=1):
        assert abs(x - y) <= tol * max(1.0, abs(x)), f"step {step}: loss {x} vs {y}"
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=weight_tol, rtol=0), f"{k}: max diff {(wa[k] - wb[k]).abs().max()}"


def test_loss_normalisation_independent_of_accumulation_and_processes(tmp_path, data_cache, varied_sft):
    """1×(batch 8), 1×(batch 2, accumulation 4) and 2 processes×(batch 2, accumulation 2) see the same
    8 samples per optimizer step, so with a token-weighted mean their losses and weights agree."""
    common = ["sft", "--data_path", str(varied_sft), "--max_steps", "4", *TINY]
    run_cli([*common, "--out_dir", str(tmp_path / "a"), "--batch_size", "8", "--peak_tflops", "1"], data_cache)
    run_cli([*common, "--out_dir", str(tmp_path / "b"), "--batch_size", "2", "--accumulation_steps", "4"], data_cache)
    run_cli([*common, "--out_dir", str(tmp_path / "c"), "--batch_size", "2", "--accumulation_steps", "2"], data_cache,
            nproc=2)
    assert read_metrics(tmp_path / "c")[0]["world_size"] == 2
    # Different batch splits sum the same gradients in a different order. Adam divides each update by
    # sqrt(v), so for a weight whose gradient is nearly zero that rounding noise becomes a visible share
    # of its update (measured: up to 1.7e-5 after 4 steps at lr 3e-3, against 1e-7 on the losses). The
    # weights are compared at 1e-4, a thirtieth of one step's size; the losses stay at 1e-5, and a
    # mean of per-batch means misses them by 4e-3 at step 2.
    assert_same_run(tmp_path / "a", tmp_path / "b", weight_tol=1e-4)
    assert_same_run(tmp_path / "a", tmp_path / "c", weight_tol=1e-4)
    # Every step's tokens are counted over all micro-batches and both ranks.
    assert [r["tokens"] for r in read_metrics(tmp_path / "a")] == [r["tokens"] for r in read_metrics(tmp_path / "c")]
    # Throughput counts every real token (prompts too), and a known peak gives model FLOPs utilisation.
    for row in read_metrics(tmp_path / "a"):
        assert row["input_tokens_per_sec"] > row["tokens_per_sec"] > 0 and 0 < row["mfu"] < 1
    assert "mfu" not in read_metrics(tmp_path / "b")[0]  # a CPU's peak is not known


def test_first_step_loss_is_the_token_mean(tmp_path, data_cache, varied_sft):
    """The logged loss of step 1 equals a direct computation: the initial model's summed token
    cross-entropy over the step's 8 conversations divided by their loss-bearing token count."""
    from minimind_scale.data.loader import make_loader
    from minimind_scale.data.prepare import prepare_dataset
    from minimind_scale.losses.causal_lm import token_cross_entropy_sum
    from minimind_scale.models.build import build_model, load_tokenizer
    from minimind_scale.training.registry import discover, get_stage

    out = tmp_path / "run"
    run_cli(["sft", "--data_path", str(varied_sft), "--max_steps", "1", "--batch_size", "8",
             "--accumulation_steps", "1", "--out_dir", str(out), "--save_interval", "0", *TINY], data_cache)
    logged = read_metrics(out)[0]

    discover()
    spec = get_stage("sft")
    cfg = spec.config(data_path=[str(varied_sft)], max_seq_len=96, num_proc=1, cache_dir=str(tmp_path / "c2"),
                      seed=7)  # the run's seed: it also draws the SFT augmentations
    tok = load_tokenizer(None)
    ds, _, _ = prepare_dataset(spec, cfg, tok, log=lambda *_: None)
    torch.manual_seed(7)
    from accelerate.utils import set_seed

    set_seed(7)
    model = build_model("tiny", tok)
    rows = next(iter(make_loader(ds, lambda r: r, 8, 1, 0, seed=7, epoch=0)))
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:  # each conversation alone (a packed row is cut where its position ids restart)
            starts = [i for i, p in enumerate(r.get("position_ids", [0])) if p == 0] + [len(r["input_ids"])]
            for a, b in zip(starts, starts[1:]):
                ids = torch.tensor([r["input_ids"][a:b]])
                labels = torch.tensor([r["labels"][a:b]])
                total += float(token_cross_entropy_sum(model(input_ids=ids).logits, labels))
                count += int((labels[:, 1:] != -100).sum())
    assert logged["tokens"] == count
    assert abs(logged["loss"] - total / count) < 1e-5


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    start = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (exit {proc.returncode}) before {path} appeared:\n"
                                 f"{proc.stderr.read()[-3000:]}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.05)


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, data_cache, varied_sft):
    """kill -9 after the step-3 checkpoint; `resume auto` continues with the same losses and weights.
    18 rows of batch 2 × accumulation 2 is 4.5 windows per epoch, so the run crosses an epoch boundary
    with a short window after the checkpoint."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(varied_sft.read_text().splitlines(keepends=True)[:18]))
    common = ["sft", "--data_path", str(data), "--max_steps", "9", "--batch_size", "2", "--accumulation_steps", "2",
              "--save_interval", "3", *TINY]
    run_cli([*common, "--out_dir", str(tmp_path / "full")], data_cache)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "minimind_scale", *common, "--out_dir", str(out)]
    # Slow the steps a little so the kill lands between the step-3 and step-6 checkpoints.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=cli_env(data_cache, MINIMIND_SCALE_TEST_STEP_DELAY="0.3"))
    _wait_for(out / "checkpoints" / "step_3" / "trainer_state.json", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists()
    assert not (out / "checkpoints" / "step_9").exists()
    resumed = run_cli([*common, "--out_dir", str(out)], data_cache)
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 10))
    assert_same_run(tmp_path / "full", out)


def test_outputs_and_cache_reuse(tmp_path, data_cache):
    """config.yaml re-runs, final/ loads and generates, and a second prepare hits the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "p.jsonl"
    data.write_text("".join((Path(__file__).resolve().parents[2] / "minimind_scale/assets/demo/pretrain.jsonl")
                            .read_text().splitlines(keepends=True)[:64]))
    cache = tmp_path / "cache"
    first = run_cli(["prepare", "pretrain", "--data_path", str(data), "--max_seq_len", "64"], cache)
    second = run_cli(["prepare", "pretrain", "--data_path", str(data), "--max_seq_len", "64"], cache)
    path = first.stdout.strip().splitlines()[-1]
    assert second.stdout.strip().splitlines()[-1] == path
    assert "tokenised" in first.stderr and "tokenis" not in second.stderr.replace("tokenised data", "")
    assert "using cached" in second.stderr
    import datasets

    ds = datasets.load_from_disk(path)
    assert {"input_ids", "labels"} <= set(ds.column_names) and len(ds) == 64

    out = tmp_path / "run"
    run_cli(["pretrain", "--data_path", str(data), "--out_dir", str(out), "--max_steps", "2", "--batch_size", "4",
             "--accumulation_steps", "1", *TINY], cache)
    rerun = run_cli(["pretrain", "--config", str(out / "config.yaml"), "--out_dir", str(tmp_path / "rerun")], cache)
    assert read_metrics(tmp_path / "rerun")[0]["loss"] == pytest.approx(read_metrics(out)[0]["loss"], abs=1e-6)
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    gen = model.generate(**tok("The capital", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > 2
    assert "using cached" in rerun.stdout + rerun.stderr
