"""Damaged or mismatched checkpoints: exit 2 naming the file (or both shapes), never a traceback, and
`resume auto` falls back to the newest intact checkpoint. One short pretrain run is shared; each test
damages a copy of its checkpoints."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import cli_in_process, run_cli
from minimind_scale.errors import CheckpointWriteFailed, UserError
from minimind_scale.training.checkpoint import find_resume_checkpoint, write_failures_reported
from minimind_scale.training.checkpoint_manifest import MANIFEST_FILE

TINY = ["--model", "tiny", "--max_seq_len", "64", "--dtype", "fp32", "--log_interval", "1", "--num_proc", "1",
        "--batch_size", "4", "--accumulation_steps", "1", "--save_interval", "2", "--max_steps", "4"]


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


# Each damage returns the file it damaged.
DAMAGES = {
    "truncated weights": lambda c: (truncate(c / "model.safetensors", 1000), "model.safetensors")[1],
    "deleted optimizer": lambda c: ((c / "optimizer.bin").unlink(), "optimizer.bin")[1],
    "truncated trainer state": lambda c: (truncate(c / "trainer_state.json", 10), "trainer_state.json")[1],
    "truncated RNG state": lambda c: (truncate(c / "random_states_0.pkl", 100), "random_states_0.pkl")[1],
    "deleted scheduler state": lambda c: ((c / "custom_checkpoint_0.pkl").unlink(), "custom_checkpoint_0.pkl")[1],
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache) -> tuple[Path, list[str]]:
    """A finished 4-step run with checkpoints at steps 2 and 4, and the command that made it."""
    root = tmp_path_factory.mktemp("damaged")
    data = root / "p.jsonl"
    demo = Path(__file__).resolve().parents[2] / "minimind_scale/assets/demo/pretrain.jsonl"
    data.write_text("".join(demo.read_text().splitlines(keepends=True)[:64]))
    out = root / "run"
    args = ["pretrain", "--data_path", str(data), "--out_dir", str(out), *TINY]
    run_cli(args, data_cache)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4"]
    return out, args


def copy_run(trained, tmp_path: Path) -> tuple[Path, list[str]]:
    """A private copy of the trained run, and its command pointed at the copy."""
    out, args = trained
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return copy, [str(copy) if a == str(out) else a for a in args]


def test_manifest_lists_every_file_with_its_size(trained):
    for checkpoint in (trained[0] / "checkpoints").iterdir():
        manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
        on_disk = {str(p.relative_to(checkpoint)): p.stat().st_size for p in checkpoint.rglob("*")
                   if p.is_file() and p.name != MANIFEST_FILE}
        assert {e["path"]: e["size"] for e in manifest["files"]} == on_disk
        assert all(len(e[manifest["algorithm"]]) >= 16 for e in manifest["files"])


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_checkpoint_is_refused_naming_the_file(trained, tmp_path, damage, capsys):
    out, args = copy_run(trained, tmp_path)
    checkpoint = out / "checkpoints" / "step_4"
    damaged = DAMAGES[damage](checkpoint)
    code, err = cli_in_process([*args, "--resume", str(checkpoint)], capsys)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert str(checkpoint / damaged) in err, err


@pytest.mark.parametrize("damage", ["truncated weights", "deleted optimizer", "truncated RNG state"])
def test_damage_without_a_manifest_is_still_refused(trained, tmp_path, data_cache, damage):
    """An older checkpoint (no manifest) is checked while loading: each library error names the file."""
    out, args = copy_run(trained, tmp_path)
    checkpoint = out / "checkpoints" / "step_4"
    (checkpoint / MANIFEST_FILE).unlink()
    damaged = DAMAGES[damage](checkpoint)
    proc = run_cli([*args, "--resume", str(checkpoint)], data_cache, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and str(checkpoint / damaged) in proc.stderr, proc.stderr[-3000:]


def test_resume_auto_skips_a_damaged_newest_checkpoint(trained, tmp_path, data_cache):
    """step_4 is damaged, step_2 has no manifest (an older checkpoint): the run resumes from step_2, says
    why, and ends with the weights of the uninterrupted run."""
    from safetensors.torch import load_file

    out, args = copy_run(trained, tmp_path)
    shutil.rmtree(out / "final")
    truncate(out / "checkpoints" / "step_4" / "model.safetensors", 1000)
    (out / "checkpoints" / "step_2" / MANIFEST_FILE).unlink()
    proc = run_cli([*args, "--resume", "auto"], data_cache)
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("resume auto:")]
    assert len(skipped) == 1 and "step_4" in skipped[0] and "model.safetensors" in skipped[0], proc.stdout
    assert f"resumed from {out / 'checkpoints' / 'step_2'} at step 2" in proc.stdout
    expected = load_file(trained[0] / "final" / "model.safetensors")
    got = load_file(out / "final" / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all((expected[k] - got[k]).abs().max() <= 1e-6 for k in expected)


def test_another_model_shape_names_both_shapes(trained, data_cache):
    out, args = trained
    proc = run_cli([*args, "--resume", str(out / "checkpoints" / "step_2"), "--hidden_size", "32"], data_cache,
                   check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "another shape" in proc.stderr, proc.stderr[-3000:]
    assert "64]" in proc.stderr and "32]" in proc.stderr, proc.stderr[-3000:]


def test_a_checkpoint_of_another_stage_is_refused(trained):
    checkpoint = trained[0] / "checkpoints" / "step_2"
    assert find_resume_checkpoint(str(checkpoint), trained[0], stage="pretrain") == checkpoint
    with pytest.raises(UserError, match="written by the pretrain stage and this run is sft"):
        find_resume_checkpoint(str(checkpoint), trained[0], stage="sft")


@pytest.mark.parametrize("code, says_make_room", [(errno.ENOSPC, True), (errno.EACCES, False)])
def test_write_failure_names_the_path_and_the_os_reason(tmp_path, code, says_make_room):
    target = tmp_path / "checkpoints" / ".tmp-step_2"
    with pytest.raises(CheckpointWriteFailed) as failure:
        with write_failures_reported(tmp_path, target):
            raise OSError(code, os.strerror(code), str(target / "optimizer.bin"))
    message = str(failure.value)
    assert str(target / "optimizer.bin") in message and errno.errorcode[code] in message
    assert ("make room" in message) == says_make_room
