"""Faults during training: NaN at step k, SIGTERM mid-epoch. Nothing completed is lost."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import cli_env, read_metrics, run_cli

TINY = ["--model", "tiny", "--max_seq_len", "96", "--dtype", "fp32", "--log_interval", "1", "--num_proc", "1",
        "--learning_rate", "3e-3", "--batch_size", "4"]


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_cache, varied_sft):
    out = tmp_path / "run"
    args = ["sft", "--data_path", str(varied_sft), "--max_steps", "8", "--save_interval", "2", "--out_dir", str(out), *TINY]
    proc = run_cli(args, data_cache, check=False, MINIMIND_SCALE_TEST_NAN_AT_STEP="5")
    assert proc.returncode == 1
    assert "step 5: loss nan" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert not (out / "final").exists()
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    # The good checkpoint resumes into a normal run.
    run_cli(args, data_cache)
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 9))


def test_nan_skip_step_policy_skips_the_update(tmp_path, data_cache, varied_sft):
    out = tmp_path / "run"
    run_cli(["sft", "--data_path", str(varied_sft), "--max_steps", "6", "--out_dir", str(out), "--nan_policy",
             "skip_step", *TINY], data_cache, MINIMIND_SCALE_TEST_NAN_AT_STEP="3")
    rows = read_metrics(out)
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert all(r["loss"] == r["loss"] for i, r in enumerate(rows) if i != 2)  # only step 3 is NaN
    assert (out / "final" / "model.safetensors").is_file()


def test_sigterm_saves_at_the_next_step_and_exits_0(tmp_path, data_cache, varied_sft):
    out = tmp_path / "run"
    args = ["sft", "--data_path", str(varied_sft), "--max_steps", "40", "--save_interval", "0", "--out_dir", str(out),
            *TINY]
    proc = subprocess.Popen([sys.executable, "-m", "minimind_scale", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=cli_env(data_cache, MINIMIND_SCALE_TEST_STEP_DELAY="0.2"))
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or len(read_metrics(out)) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "stopped by SIGTERM" in stdout
    saved = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(saved) == 1 and saved[0].startswith("step_")
    step = int(saved[0].split("_")[1])
    assert 3 <= step < 40 and not (out / "final").exists()
    run_cli(args, data_cache)  # the same command continues to the end
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 41))
