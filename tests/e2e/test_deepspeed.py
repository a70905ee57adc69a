"""Scale-out on 2 CPU processes: DeepSpeed ZeRO 0-3 (through Accelerate's plugin), the deepspeed
launcher, launch.sh, and exact resume after kill -9 under DDP and ZeRO-2."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import REPO, cli_env, read_metrics, run_cli

TINY = ["--model", "tiny", "--max_seq_len", "96", "--dtype", "fp32", "--log_interval", "1", "--num_proc", "1",
        "--learning_rate", "3e-3", "--seed", "11"]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out)]


def assert_close(a: list[float], b: list[float], tol: float) -> None:
    assert len(a) == len(b), (a, b)
    for step, (x, y) in enumerate(zip(a, b), start=1):
        assert abs(x - y) <= tol * max(1.0, abs(x)), f"step {step}: {x} vs {y}"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, data_cache, varied_sft):
    """One process with twice the per-process batch: the reference for every 2-process backend."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    run_cli(["sft", "--data_path", str(varied_sft), "--max_steps", "4", "--batch_size", "8", "--out_dir", str(out),
             *TINY], data_cache)
    return out


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_matches_single_process(stage, tmp_path, data_cache, varied_sft, baseline):
    out = tmp_path / "run"
    run_cli(["sft", "--data_path", str(varied_sft), "--max_steps", "4", "--batch_size", "4", "--out_dir", str(out),
             "--deepspeed", str(REPO / "ds_configs" / f"zero{stage}.json"), *TINY], data_cache, nproc=2)
    rows = read_metrics(out)
    assert all(r["world_size"] == 2 for r in rows)
    assert_close(losses(baseline), losses(out), 1e-4)
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in read_metrics(baseline)]
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    reference = AutoModelForCausalLM.from_pretrained(baseline / "final")
    # The gathered weights are the full model (not ZeRO-3's empty placeholders) and match the reference run.
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert p.shape == q.shape and p.numel() > 0, name
        assert torch.allclose(p, q, atol=1e-4), f"{name}: {(p - q).abs().max()}"


def test_deepspeed_launcher(tmp_path, data_cache, varied_sft, baseline):
    """`deepspeed --num_gpus 2 --module minimind_scale ...` (which appends --local_rank) on CPU processes."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_free_port()),
           "--module", "minimind_scale", "sft", "--data_path", str(varied_sft), "--max_steps", "4",
           "--batch_size", "4", "--out_dir", str(out), "--deepspeed", str(REPO / "ds_configs" / "zero2.json"), *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=cli_env(data_cache))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_close(losses(baseline), losses(out), 1e-4)


def test_launch_sh_cpu_processes(tmp_path, data_cache, varied_sft, baseline):
    out = tmp_path / "run"
    env = cli_env(data_cache, PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run([str(REPO / "launch.sh"), "sft", "--cpu", "2", "--master_port", str(_free_port()), "--",
                           "--data_path", str(varied_sft), "--max_steps", "4", "--batch_size", "4",
                           "--out_dir", str(out), *TINY], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("+ accelerate launch --multi_gpu --num_processes 2")
    assert_close(losses(baseline), losses(out), 1e-5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", ["ddp", "zero2"])
def test_resume_after_kill_9_on_two_processes(backend, tmp_path, data_cache, varied_sft):
    extra = ["--deepspeed", str(REPO / "ds_configs" / "zero2.json")] if backend == "zero2" else []
    common = ["sft", "--data_path", str(varied_sft), "--max_steps", "8", "--batch_size", "2",
              "--accumulation_steps", "2", "--save_interval", "2", *extra, *TINY]
    run_cli([*common, "--out_dir", str(tmp_path / "full")], data_cache, nproc=2)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "minimind_scale", *common, "--out_dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=cli_env(data_cache, MINIMIND_SCALE_TEST_STEP_DELAY="0.5"))
    marker = out / "checkpoints" / "step_4" / "trainer_state.json"
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no step-4 checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, with no chance to clean up
    proc.wait()
    assert not (out / "final").exists()
    run_cli([*common, "--out_dir", str(out)], data_cache, nproc=2)
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 9))
    assert_close(losses(tmp_path / "full"), losses(out), 1e-5)


def test_zero3_cpu_offload_matches_single_process(tmp_path, data_cache, varied_sft, baseline):
    """Optimizer and parameters offloaded to CPU memory (DeepSpeed's CPU Adam) train the same steps."""
    out = tmp_path / "run"
    run_cli(["sft", "--data_path", str(varied_sft), "--max_steps", "4", "--batch_size", "4", "--out_dir", str(out),
             "--deepspeed", str(REPO / "ds_configs" / "zero3_offload.json"), *TINY], data_cache, nproc=2)
    assert_close(losses(baseline), losses(out), 1e-4)
    assert AutoModelForCausalLM.from_pretrained(out / "final").num_parameters() > 0


def test_resume_with_another_process_count_is_refused(tmp_path, data_cache, varied_sft, baseline):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    proc = run_cli(["sft", "--data_path", str(varied_sft), "--max_steps", "8", "--batch_size", "4",
                    "--out_dir", str(out), *TINY], data_cache, nproc=2, check=False)
    # Each rank exits 2; torchrun itself reports a failed child as 1 and names the child's code.
    assert proc.returncode != 0 and "exitcode: 2" in proc.stderr
    assert "written by 1 process(es) and this run has 2" in proc.stderr
    assert not any("minimind_scale" in line and "File" in line for line in proc.stderr.splitlines())
