"""Faults during training: NaN at step k, SIGTERM mid-epoch, a rank that dies, a checkpoint that cannot be
written. Nothing completed is lost."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import cli_env, read_metrics, run_cli

TINY = ["--model", "tiny", "--max_seq_len", "96", "--dtype", "fp32", "--log_interval", "1", "--num_proc", "1",
        "--learning_rate", "3e-3", "--batch_size", "4"]


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_cache, varied_sft):
    out = tmp_path / "run"
    args = ["sft", "--data_path", str(varied_sft), "--max_steps", "8", "--save_interval", "2", "--out_dir", str(out),
            *TINY]
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


def _rank_pid(launcher_pid: int, rank: int) -> int:
    """The worker of `rank` among a torchrun agent's children (read from its environment)."""
    for child in subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split():
        if f"RANK={rank}" in Path(f"/proc/{child}/environ").read_text().split("\0"):
            return int(child)
    raise AssertionError(f"no rank {rank} among the children of {launcher_pid}")


def test_rank_death_stops_the_others_with_a_message(tmp_path, data_cache, varied_sft):
    out = tmp_path / "run"
    args = ["sft", "--data_path", str(varied_sft), "--max_steps", "12", "--save_interval", "2", "--out_dir", str(out),
            *TINY]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "minimind_scale", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(data_cache, MINIMIND_SCALE_TEST_STEP_DELAY="0.5"))
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or len(read_metrics(out)) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    killed_at = time.time()
    _, stderr = proc.communicate(timeout=120)
    # torchrun's agent would SIGKILL a hung rank after 30 s; rank 0 must have left on its own, at once.
    assert time.time() - killed_at < 20, stderr[-3000:]
    assert proc.returncode != 0
    assert "error: another process of this 2-process run stopped or became unreachable" in stderr, stderr[-3000:]
    assert "[rank0]: Traceback" not in stderr and "checkpoints/step_2" in stderr, stderr[-3000:]
    assert not (out / "final").exists()
    run_cli(args, data_cache, nproc=2)  # the same command resumes and finishes
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 13))


def _file_size_limit(max_bytes: int):
    """Make writes past `max_bytes` fail with EFBIG, as a full disk fails them with ENOSPC (Python
    ignores SIGXFSZ, so the write returns the error instead of killing the process)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))


def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, data_cache, varied_sft):
    out = tmp_path / "run"
    first = ["sft", "--data_path", str(varied_sft), "--save_interval", "2", "--out_dir", str(out), *TINY]
    run_cli([*first, "--max_steps", "2"], data_cache)
    step_2 = out / "checkpoints" / "step_2"
    before = {p.name: p.read_bytes() for p in step_2.iterdir()}
    optimizer_bytes = (step_2 / "optimizer.bin").stat().st_size
    # The next save resumes from step_2 and fails to write a file as large as the optimizer state.
    proc = subprocess.run([sys.executable, "-m", "minimind_scale", *first, "--max_steps", "4"], capture_output=True,
                          text=True, timeout=300, env=cli_env(data_cache),
                          preexec_fn=_file_size_limit(optimizer_bytes // 2))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert re.search(r"^error: could not write \S*\.tmp-step_4 \(", proc.stderr, re.M), proc.stderr[-3000:]
    assert f"{step_2} is intact" in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2"]  # no partial copy left
    assert {p.name: p.read_bytes() for p in step_2.iterdir()} == before
    run_cli([*first, "--max_steps", "4"], data_cache)  # with room again, the same command resumes from step_2
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    assert (out / "final" / "model.safetensors").is_file() and not (out / ".tmp-final").exists()
