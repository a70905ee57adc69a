"""Output directories: an out_dir that cannot be written is refused before any work, and one out_dir takes one
run at a time. Each refusal is exit 2 with one readable message and leaves the disk as it was."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import cli_env, read_metrics
from minimind_scale.errors import UserError
from minimind_scale.training.out_dir import LOCK_NAME, hold_out_dir

TINY = ["--model", "tiny", "--max_seq_len", "96", "--dtype", "fp32", "--log_interval", "1", "--num_proc", "1",
        "--batch_size", "4"]
# Root ignores permission bits; without these capabilities chmod binds it as it binds any user.
UNPRIVILEGED = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                "--bounding-set=-dac_override,-dac_read_search"]


def start_sft(out_dir: Path, data: Path, cache: Path, *extra: str, prefix=(), **env) -> subprocess.Popen:
    cmd = [*prefix, sys.executable, "-m", "minimind_scale", "sft", "--data_path", str(data), "--out_dir",
           str(out_dir), *TINY, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(cache, **env))


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its mode and size: what a refused run must leave unchanged."""
    return {str(p.relative_to(root)): (p.stat().st_mode, p.stat().st_size) for p in sorted(root.rglob("*"))}


def assert_refused(proc: subprocess.Popen, *named: str) -> str:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stdout[-2000:] + stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    for text in named:
        assert text in errors[0], errors[0]
    return errors[0]


def _file(work: Path) -> tuple[Path, Path]:
    (work / "taken").write_text("a file\n")
    return work / "taken", work / "taken"


def _under_file(work: Path) -> tuple[Path, Path]:
    (work / "taken").write_text("a file\n")
    return work / "taken" / "run", work / "taken"


def _read_only_parent(work: Path) -> tuple[Path, Path]:
    (work / "parent").mkdir(mode=0o555)
    return work / "parent" / "run", work / "parent"


def _read_only_out_dir(work: Path) -> tuple[Path, Path]:
    (work / "run").mkdir(mode=0o555)
    return work / "run", work / "run"


def _read_only_checkpoints(work: Path) -> tuple[Path, Path]:
    (work / "run" / "checkpoints").mkdir(parents=True)
    (work / "run" / "checkpoints").chmod(0o555)
    return work / "run", work / "run" / "checkpoints"


@pytest.mark.parametrize("make", [_file, _under_file, _read_only_parent, _read_only_out_dir,
                                  _read_only_checkpoints])
def test_an_unwritable_out_dir_is_refused_before_any_work(make, tmp_path, data_cache, varied_sft):
    work = tmp_path / "work"
    work.mkdir()
    out_dir, culprit = make(work)
    before = tree(work)
    message = assert_refused(start_sft(out_dir, varied_sft, data_cache, "--max_steps", "1", prefix=UNPRIVILEGED),
                             str(culprit))
    assert "Traceback" not in message
    assert tree(work) == before


def test_a_second_run_into_a_busy_out_dir_exits_at_once(tmp_path, data_cache, varied_sft):
    out = tmp_path / "run"
    first = start_sft(out, varied_sft, data_cache, "--max_steps", "30", "--learning_rate", "3e-3", "--seed", "1",
                      "--save_interval", "10", MINIMIND_SCALE_TEST_STEP_DELAY="0.5")
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or not read_metrics(out):
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.1)
    holder = json.loads((out / LOCK_NAME).read_text())
    second = start_sft(out, varied_sft, data_cache, "--max_steps", "30", "--learning_rate", "9e-3", "--seed", "2")
    assert_refused(second, socket.gethostname(), f"PID {first.pid}", holder["started"])
    assert first.poll() is None, "the first run ended before the second was refused: the test proved nothing"

    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["learning_rate"], config["seed"]) == (3e-3, 1)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert max(r["lr"] for r in rows) <= 3e-3  # the second run's peak is 9e-3
    assert (out / "final" / "model.safetensors").is_file()
    assert not (out / LOCK_NAME).exists()  # released at exit


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_stale_lock_on_this_host_is_taken_over_with_a_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    pid = _dead_pid()
    (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": "earlier"}))
    said = []
    lock = hold_out_dir(out, said.append)
    assert len(said) == 1 and "stale lock" in said[0] and f"PID {pid}" in said[0] and "has ended" in said[0]
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert sorted(out.iterdir()) == []


def test_a_live_lock_or_one_from_another_host_is_never_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from minimind_scale.training.out_dir import "
                               "hold_out_dir; hold_out_dir(sys.argv[1], print); print('held', flush=True); "
                               "sys.stdin.read()", str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree(out)
        with pytest.raises(UserError, match=f"in use by another run .*PID {holder.pid}, started "):
            hold_out_dir(out, print)
        assert tree(out) == before
    finally:
        holder.communicate("", timeout=60)
    assert not out.exists()  # the holder made it, found it empty at exit and removed it

    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": _dead_pid(), "started": "earlier"}))
    with pytest.raises(UserError, match="host elsewhere"):
        hold_out_dir(out, print)
    assert [p.name for p in out.iterdir()] == [LOCK_NAME]


def test_a_run_that_fails_after_creating_its_out_dir_removes_it(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    lock = hold_out_dir(out, print)
    assert (out / LOCK_NAME).is_file()
    lock.release()
    assert sorted(tmp_path.iterdir()) == []
