"""A weighted, capped mix of two SFT files with a `val` split, end to end: what data_report.json says each file
gives, an exact resume after kill -9 mid-epoch (training losses, evaluations and best/ as if never stopped),
and a resume that would continue another mix refused."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_training import TINY, _wait_for, final_weights

from conftest import DEMO, cli_env, read_metrics, run_cli

# Conversations and pretraining texts, 3:1; each file capped; a fifth held out; packed; two epochs.
WEIGHTS = ["--data_weights", "0.75", "0.25"]
STEPS = 28          # 40 records an epoch, packed, make 14 steps of 2 rows
KILL_AFTER = 20     # a checkpoint in the middle of the second epoch
TOLERANCE = 1e-5


def _args(data: list[Path], out: Path, *extra: str) -> list[str]:
    return ["sft", "--data_path", *map(str, data), *WEIGHTS, "--max_samples", "30", "20", "--val_size", "0.2",
            "--packing", "true", "--epochs", "2", "--batch_size", "2", "--eval_interval", "3", "--save_interval", "4",
            "--save_best_metric", "eval/val/loss", "--out_dir", str(out), *TINY, *extra]


@pytest.fixture(scope="module")
def mix_files(tmp_path_factory, varied_sft) -> list[Path]:
    """48 conversations and 20 pretraining texts ({"text": ...}), both from the bundled demo data."""
    texts = tmp_path_factory.mktemp("mix") / "texts.jsonl"
    texts.write_text("".join((DEMO / "pretrain.jsonl").read_text().splitlines(keepends=True)[:20]))
    return [varied_sft, texts]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_cache, mix_files) -> Path:
    out = tmp_path_factory.mktemp("mix_runs") / "uninterrupted"
    run_cli(_args(mix_files, out), data_cache)
    return out


def _eval_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if "eval/val/loss" in r]


def _training_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if "loss" in r]


def test_data_report_gives_each_file_its_largest_remainder_share(uninterrupted):
    """Caps keep 30 and 20 (all) records; 0.2 of those 50 is 10 held out, 6 and 4 in proportion; the 40 left
    make an epoch of 40 draws, 0.75 and 0.25 of it: 30 and 10."""
    report = json.loads((uninterrupted / "data_report.json").read_text())
    assert report["file_records"] == [48, 20]
    sources = report["sources"]
    assert [s["train_records"] for s in sources] == [24, 16]
    assert [s["val_records"] for s in sources] == [6, 4]
    assert [s["records_per_epoch"] for s in sources] == [30, 10]
    assert [s["weight"] for s in sources] == [0.75, 0.25]
    assert all(s["tokens"] > 0 for s in sources)
    # val.jsonl holds the held-out records themselves: 6 conversations and 4 texts, none twice
    held_out = [json.loads(line) for line in (uninterrupted / "val.jsonl").read_text().splitlines()]
    assert sum("conversations" in r for r in held_out) == 6 and sum("text" in r for r in held_out) == 4
    assert len({json.dumps(r, sort_keys=True) for r in held_out}) == 10
    assert [r["step"] for r in _training_rows(uninterrupted)] == list(range(1, STEPS + 1))
    assert [r["step"] for r in _eval_rows(uninterrupted)] == [*range(3, STEPS, 3), STEPS]


def _kill_after_an_evaluation_past(cmd: list[str], out: Path, step: int, data_cache: Path) -> None:
    """Run `cmd`, slowed down, and kill -9 it once the step-`step` checkpoint exists and an evaluation after
    it is logged (so the killed run leaves training rows, an evaluation and maybe best/ to be redone)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=cli_env(data_cache, MINIMIND_SCALE_TEST_STEP_DELAY="0.3"))
    _wait_for(out / "checkpoints" / f"step_{step}" / "trainer_state.json", proc)
    deadline = time.time() + 120
    while not any(r["step"] > step for r in _eval_rows(out)):
        assert proc.poll() is None, f"run ended (exit {proc.returncode}) before the kill:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "no evaluation after the checkpoint"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists()


def _assert_close(a: float, b: float, what: str) -> None:
    assert abs(a - b) <= TOLERANCE * max(1.0, abs(a)), f"{what}: {a} vs {b}"


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() <= TOLERANCE, name


def test_kill_9_mid_epoch_resumes_training_and_evaluation_exactly(tmp_path, data_cache, mix_files, uninterrupted):
    out = tmp_path / "killed"
    _kill_after_an_evaluation_past([sys.executable, "-m", "minimind_scale", *_args(mix_files, out)], out, KILL_AFTER,
                                   data_cache)
    resumed = run_cli(_args(mix_files, out), data_cache)
    assert f"resumed from {out / 'checkpoints' / f'step_{KILL_AFTER}'}" in resumed.stdout
    expected, got = _training_rows(uninterrupted), _training_rows(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert 1 < got[KILL_AFTER - 1]["epoch"] < 2 and got[-1]["epoch"] == 2  # killed mid-way through epoch 2
    for want, have in zip(expected, got):
        _assert_close(want["loss"], have["loss"], f"step {want['step']} loss")
    _assert_same_weights(final_weights(uninterrupted), final_weights(out))
    expected, got = _eval_rows(uninterrupted), _eval_rows(out)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for want, have in zip(expected, got):
        for metric in ("eval/val/loss", "eval/val/ppl"):
            _assert_close(want[metric], have[metric], f"step {want['step']} {metric}")
    best, best_resumed = (json.loads((d / "best" / "best_metric.json").read_text()) for d in (uninterrupted, out))
    assert {k: best_resumed[k] for k in ("metric", "mode", "step")} == {k: best[k] for k in ("metric", "mode", "step")}
    _assert_close(best["value"], best_resumed["value"], "best value")
    assert best["eval"].keys() == best_resumed["eval"].keys()
    for metric in best["eval"]:
        _assert_close(best["eval"][metric], best_resumed["eval"][metric], f"best {metric}")
    _assert_same_weights(*(load_file(str(d / "best" / "model.safetensors")) for d in (uninterrupted, out)))


def test_resuming_with_other_weights_is_refused(tmp_path, data_cache, mix_files, uninterrupted):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    before = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "data_report.json")}
    args = _args(mix_files, out)
    args[args.index("0.75"):args.index("0.75") + 2] = ["0.5", "0.5"]
    proc = run_cli(args, data_cache, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "was trained on another selection of the data" in proc.stderr and "--data_weights" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {name: (out / name).read_bytes() for name in before} == before
