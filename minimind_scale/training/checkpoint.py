"""Atomic, resumable checkpoints: accelerate's save_state under a temporary name, then one rename (publish.py).

A directory named ``step_N`` is complete by construction (the rename is the last act of a save), so
``resume auto`` can never pick a checkpoint whose writer died half-way. Its manifest (checkpoint_manifest.py),
written just before that rename, lets a resume verify every file before loading any: a file damaged later
is named, and ``resume auto`` falls back to the newest intact checkpoint.
"""
from __future__ import annotations

import contextlib
import errno
import json
import pickle
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from minimind_scale.data.publish import STAGING_PREFIX, fresh_dir, publish_once
from minimind_scale.errors import CheckpointWriteFailed, UserError
from minimind_scale.training.checkpoint_manifest import (
    DamagedCheckpoint,
    Verified,
    describe_files,
    files_under,
    share_of,
    verify_files,
    write_manifest,
)
from minimind_scale.training.distributed import LaunchEnv

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


def say_on_main(message: str) -> None:
    """Print once per run, not once per process."""
    if LaunchEnv.from_environ().is_main:
        print(message, flush=True)


def find_resume_checkpoint(resume: str, out_dir: Path, stage: str | None = None) -> Path | None:
    """The checkpoint to resume from, verified: `resume` is never, auto (the newest intact one) or a path.
    `stage`, when given, must be the stage that wrote it."""
    if resume == "never":
        return None
    if resume == "auto":
        return newest_intact_checkpoint(out_dir, stage)
    p = Path(resume)
    if not (p / STATE_FILE).is_file():
        raise UserError(f"resume: {resume} is not a checkpoint directory (no {STATE_FILE} in it)")
    say_on_main(f"resume: {p}: {verify_checkpoint(p, stage).summary()}")
    return p


def newest_intact_checkpoint(out_dir: Path, stage: str | None = None) -> Path | None:
    """The newest checkpoint that passes verification, saying which newer ones were skipped and why."""
    found = complete_checkpoints(out_dir)
    for checkpoint in reversed(found):
        try:
            verified = verify_checkpoint(checkpoint, stage)
        except DamagedCheckpoint as e:
            say_on_main(f"resume auto: {e}; trying the previous checkpoint")
            continue
        say_on_main(f"resume: {checkpoint}: {verified.summary()}")
        return checkpoint
    if found:
        raise UserError(f"resume auto: none of the {len(found)} checkpoint(s) in {checkpoints_dir(out_dir)} is "
                        "intact (see above). Use --resume never to start over, or --resume with another checkpoint.")
    return None


def verify_checkpoint(checkpoint: Path, stage: str | None = None) -> Verified:
    """Check, before anything is loaded, that every file the manifest lists is whole and that the trainer
    state parses (and names `stage`, when given). Damage is a DamagedCheckpoint naming the file; a checkpoint
    without a manifest (written before manifests existed) gets the trainer-state check only."""
    verified = verify_files(checkpoint)
    saved = read_state(checkpoint).stage
    if stage and saved and saved != stage:
        raise UserError(f"{checkpoint} was written by the {saved} stage and this run is {stage}: a checkpoint "
                        f"resumes only its own stage. To start {stage} from those weights, export the checkpoint "
                        "and pass the model directory as --model, with a new out_dir.")
    return verified


def read_state(path: Path) -> TrainState:
    """The trainer state of a checkpoint; a missing or unreadable file is a DamagedCheckpoint."""
    file = path / STATE_FILE
    try:
        return TrainState(**json.loads(file.read_text()))
    except FileNotFoundError:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: {file} is missing") from None
    except (ValueError, TypeError) as e:  # not JSON, not an object, or unknown fields
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: {file} cannot be read ({e})") from None


def os_reason(error: BaseException) -> tuple[str, bool]:
    """The OS's reason for a failed write, and whether it is a full disk (ENOSPC). torch and safetensors
    wrap the OSError, or only keep its text, so the cause chain and the message are both searched."""
    cause, seen = error, 0
    while cause is not None and not isinstance(cause, OSError) and seen < 8:
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    if isinstance(cause, OSError) and cause.errno:
        where = f" at {cause.filename}" if cause.filename else ""
        name = errno.errorcode.get(cause.errno, str(cause.errno))
        return f"{name}: {cause.strerror}{where}", cause.errno == errno.ENOSPC
    text = str(error).strip()
    return f"{type(error).__name__}: {text[:200]}", "No space left" in text


@contextlib.contextmanager
def write_failures_reported(out_dir: Path, what: Path):
    """A failed write stops the run naming the path, the OS's reason and the checkpoint that is intact;
    publish_once has already removed the partial copy, so nothing half-written remains. "Make room" is
    said only for a full disk (ENOSPC): a quota, a file-size limit or a permission needs another fix."""
    try:
        yield
    except Exception as e:
        reason, no_space = os_reason(e)
        intact = newest_checkpoint(out_dir)
        try:
            free = f"{shutil.disk_usage(out_dir).free / 2**20:.0f} MiB free on that disk"
        except OSError:
            free = "free space unknown"
        remedy = "make room" if no_space else "fix the cause"
        raise CheckpointWriteFailed(
            f"could not write {what} ({reason}; {free}). The partial copy was removed. "
            + (f"{intact} is intact: {remedy} and run the same command again to resume from it."
               if intact else f"No earlier checkpoint exists: {remedy} and run the same command again.")) from None


def stage_state_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"stage_state_{rank}.pt"


def save_checkpoint(accelerator, out_dir: Path, state: TrainState, keep: int, stage_state=None) -> Path:
    """Every rank writes its part (accelerate's state, the stage's own state) into one staging directory;
    the main process writes the trainer state, then the manifest of every file, and publishes the directory
    last. Older checkpoints are pruned only once the new one is published, so an intact one always remains."""
    target = checkpoints_dir(out_dir) / f"step_{state.step}"
    staging = checkpoints_dir(out_dir) / f"{STAGING_PREFIX}{target.name}"
    if accelerator.is_main_process:
        fresh_dir(staging)
    accelerator.wait_for_everyone()

    def write_parts(path: Path) -> None:
        accelerator.save_state(str(path), safe_serialization=True)
        if stage_state is not None and stage_state.state_dict():
            torch.save(stage_state.state_dict(), stage_state_file(path, accelerator.process_index))
        if accelerator.is_main_process:
            (path / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        accelerator.wait_for_everyone()
        write_checkpoint_manifest(accelerator, path)

    with write_failures_reported(out_dir, staging):
        publish_once(target, write_parts, is_complete=lambda t: (t / STATE_FILE).is_file(),
                     builder=accelerator.is_main_process, staging=staging, replace=True, collective=True,
                     waiters=False)
    if accelerator.is_main_process:
        for old in complete_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def write_checkpoint_manifest(accelerator, path: Path) -> None:
    """Every process hashes its share of the written files; the main process writes the merged manifest,
    the last file of the checkpoint. Called once every process has written its part."""
    from accelerate.utils import gather_object

    started = time.perf_counter()
    mine = describe_files(path, share_of(files_under(path), accelerator.process_index, accelerator.num_processes))
    parts = gather_object([{"entries": mine, "sec": time.perf_counter() - started}])
    if accelerator.is_main_process:
        write_manifest(path, [e for part in parts for e in part["entries"]], max(part["sec"] for part in parts))


LOAD_ERRORS = (SafetensorError, OSError, EOFError, pickle.UnpicklingError, RuntimeError, ValueError, KeyError)
SIZE_MISMATCH = re.compile(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) "
                           r"from checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)")


def first_line_of(error: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def unreadable_file(checkpoint: Path) -> tuple[Path, str] | None:
    """The first file of `checkpoint` that its reader rejects, and why (used only once loading failed)."""
    from safetensors.torch import load_file

    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".bin",
                                                                                          ".pkl", ".pt"}):
        try:
            if path.suffix == ".safetensors":
                load_file(path)
            else:
                torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # any reader error marks this file as the damaged one
            return path, first_line_of(e)
    return None


def load_error_as_user_error(checkpoint: Path, error: Exception) -> UserError:
    """Rephrase a library's loading error: a model of another shape, or the file that is damaged."""
    text = str(error)
    mismatch = SIZE_MISMATCH.search(text)
    if mismatch:
        name, saved, current = mismatch.groups()
        return UserError(f"checkpoint {checkpoint} holds a model of another shape: {name} is {saved} there and "
                         f"{current} in this run (another --hidden_size, --num_hidden_layers or --model?). Resume "
                         "with the options it was trained with, or start a new out_dir.")
    if "Error(s) in loading state_dict" in text:
        return UserError(f"checkpoint {checkpoint} holds another model than this run builds "
                         f"({first_line_of(error)}). Resume with the options it was trained with.")
    if isinstance(error, FileNotFoundError) and error.filename:
        return DamagedCheckpoint(f"checkpoint {checkpoint} is damaged: {error.filename} is missing")
    found = unreadable_file(checkpoint)
    if found:
        return DamagedCheckpoint(f"checkpoint {checkpoint} is damaged: {found[0]} cannot be read ({found[1]})")
    return DamagedCheckpoint(f"checkpoint {checkpoint} cannot be loaded ({first_line_of(error)})")


def check_rng_state(checkpoint: Path, rank: int) -> None:
    """accelerate ignores an unreadable RNG state without a word, and the run would then not continue its
    random streams: read it first, so damage is named."""
    path = checkpoint / f"random_states_{rank}.pkl"
    try:
        torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise DamagedCheckpoint(f"checkpoint {checkpoint} is damaged: {path} is missing") from None
    except Exception as e:  # any reader error: truncated, not a pickle, ...
        raise DamagedCheckpoint(f"checkpoint {checkpoint} is damaged: {path} cannot be read "
                                f"({type(e).__name__})") from None


def load_checkpoint(accelerator, checkpoint: Path, stage_state=None) -> TrainState:
    """Restore what save_checkpoint wrote; returns the trainer state. A damaged file or a model of another
    shape is a UserError naming the checkpoint (and the file, where it can be found)."""
    check_rng_state(checkpoint, accelerator.process_index)
    saved = stage_state_file(checkpoint, accelerator.process_index)
    try:
        accelerator.load_state(str(checkpoint))
        if stage_state is not None and saved.is_file():
            stage_state.load_state_dict(torch.load(saved, weights_only=False))
    except LOAD_ERRORS as e:
        raise load_error_as_user_error(checkpoint, e) from None
    return read_state(checkpoint)
