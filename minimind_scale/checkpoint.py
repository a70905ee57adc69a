"""Atomic, resumable checkpoints: accelerate's save_state under a temporary name, then one rename.

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
from typing import Optional

from .errors import CheckpointWriteFailed, UserError

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


def newest_checkpoint(out_dir: Path) -> Optional[Path]:
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


def find_resume_checkpoint(resume: str, out_dir: Path) -> Optional[Path]:
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
def removed_on_write_failure(partial: Path, out_dir: Path):
    """A failed write (full disk, quota, file-size limit) removes the partial copy, so the space comes
    back and nothing half-written remains, then stops the run naming the checkpoint that is intact.
    torch.save reports such failures as RuntimeError, safetensors as its own error type."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - any failure while writing leaves the same state behind
        shutil.rmtree(partial, ignore_errors=True)
        intact = newest_checkpoint(out_dir)
        try:
            free = f"{shutil.disk_usage(out_dir).free / 2**20:.0f} MiB free on that disk"
        except OSError:
            free = "free space unknown"
        raise CheckpointWriteFailed(
            f"could not write {partial} ({type(e).__name__}: {str(e).strip()[:200]}; {free}). The partial copy was "
            "removed. " + (f"{intact} is intact: make room and run the same command again to resume from it."
                           if intact else "No earlier checkpoint exists.")) from None


def save_checkpoint(accelerator, out_dir: Path, state: TrainState, keep: int) -> Path:
    """Every rank writes its part into a temporary directory; the main process renames it last."""
    final = checkpoints_dir(out_dir) / f"step_{state.step}"
    tmp = checkpoints_dir(out_dir) / f".tmp-step_{state.step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with removed_on_write_failure(tmp, out_dir):
        accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with removed_on_write_failure(tmp, out_dir):
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        if final.exists():  # the same step saved by an earlier, resumed run
            shutil.rmtree(final)
        tmp.rename(final)
        for old in complete_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
