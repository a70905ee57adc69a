"""Atomic, resumable checkpoints: accelerate's save_state under a temporary name, then one rename (publish.py).

A directory named ``step_N`` is complete by construction (the rename is the last act of a save), so
``resume auto`` can never pick a checkpoint whose writer died half-way.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from minimind_scale.data.publish import STAGING_PREFIX, fresh_dir, publish_once
from minimind_scale.errors import CheckpointWriteFailed, UserError

STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainState:
    step: int = 0              # optimizer steps done
    epoch: int = 0             # current epoch
    batch_in_epoch: int = 0    # micro-batches this rank consumed in the current epoch
    tokens: int = 0            # loss-bearing tokens seen, all ranks
    elapsed_sec: float = 0.0   # training time before this process started
    world_size: int = 1
    skipped_steps: int = 0     # updates skipped for a non-finite loss (nan_policy skip_step)
    stage: str = ""            # the stage that trained it, so tools (export) rebuild its model class
    data_identity: str = ""    # the data selection's hash (caps, val split, weights): a resume must continue it
    best_value: float | None = None      # the monitored evaluation metric's best value so far
    best_step: int | None = None         # the step it was measured at (the weights in best/)
    evals_without_improvement: int = 0   # for early stopping


def checkpoints_dir(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def complete_checkpoints(out_dir: Path) -> list[Path]:
    found = []
    d = checkpoints_dir(out_dir)
    if d.is_dir():
        for p in d.iterdir():
            m = STEP_DIR.match(p.name)
            if m and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def newest_checkpoint(out_dir: Path) -> Path | None:
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


def find_resume_checkpoint(resume: str, out_dir: Path) -> Path | None:
    if resume == "never":
        return None
    if resume == "auto":
        return newest_checkpoint(out_dir)
    p = Path(resume)
    if not (p / STATE_FILE).is_file():
        raise UserError(f"resume: {resume} is not a checkpoint directory (no {STATE_FILE} in it)")
    return p


def read_state(path: Path) -> TrainState:
    return TrainState(**json.loads((path / STATE_FILE).read_text()))


@contextlib.contextmanager
def write_failures_reported(out_dir: Path, what: Path):
    """A failed write (full disk, quota, file-size limit) stops the run naming the checkpoint that is
    intact; publish_once has already removed the partial copy, so the space comes back and nothing
    half-written remains. torch.save reports such failures as RuntimeError, safetensors as its own type."""
    try:
        yield
    except Exception as e:
        intact = newest_checkpoint(out_dir)
        try:
            free = f"{shutil.disk_usage(out_dir).free / 2**20:.0f} MiB free on that disk"
        except OSError:
            free = "free space unknown"
        raise CheckpointWriteFailed(
            f"could not write {what} ({type(e).__name__}: {str(e).strip()[:200]}; {free}). The partial copy was "
            "removed. " + (f"{intact} is intact: make room and run the same command again to resume from it."
                           if intact else "No earlier checkpoint exists.")) from None


def stage_state_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"stage_state_{rank}.pt"


def save_checkpoint(accelerator, out_dir: Path, state: TrainState, keep: int, stage_state=None) -> Path:
    """Every rank writes its part (accelerate's state, the stage's own state) into one staging directory;
    the main process writes the trainer state and publishes the directory last."""
    target = checkpoints_dir(out_dir) / f"step_{state.step}"
    staging = checkpoints_dir(out_dir) / f"{STAGING_PREFIX}{target.name}"
    if accelerator.is_main_process:
        fresh_dir(staging)
    accelerator.wait_for_everyone()

    def write_parts(path: Path) -> None:
        accelerator.save_state(str(path), safe_serialization=True)
        if stage_state is not None and stage_state.state_dict():
            torch.save(stage_state.state_dict(), stage_state_file(path, accelerator.process_index))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (path / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))

    with write_failures_reported(out_dir, staging):
        publish_once(target, write_parts, is_complete=lambda t: (t / STATE_FILE).is_file(),
                     builder=accelerator.is_main_process, staging=staging, replace=True, collective=True,
                     waiters=False)
    if accelerator.is_main_process:
        for old in complete_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def load_checkpoint(accelerator, checkpoint: Path, stage_state=None) -> TrainState:
    """Restore what save_checkpoint wrote; returns the trainer state."""
    accelerator.load_state(str(checkpoint))
    saved = stage_state_file(checkpoint, accelerator.process_index)
    if stage_state is not None and saved.is_file():
        stage_state.load_state_dict(torch.load(saved, weights_only=False))
    return read_state(checkpoint)
