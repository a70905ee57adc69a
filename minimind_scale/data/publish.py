"""Build a directory under a temporary name, then publish it with one rename: it is complete or absent.

The tokenised-data cache, the packed cache, checkpoints and final/ are all written this way, so a
reader (a resumed run, another rank, a rerun) never sees a half-written directory.
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from minimind_scale.errors import UserError

STAGING_PREFIX = ".tmp-"


def failure_marker(target: Path) -> Path:
    """Where a builder leaves its error for the processes that wait on it."""
    return target.with_name(target.name + ".failed")


def publish_once(target: Path, build: Callable[[Path], object], *, is_complete: Callable[[Path], bool],
                 builder: bool = True, staging: Path | None = None, replace: bool = False,
                 collective: bool = False, waiters: bool = True, poll_sec: float = 1.0):
    """Make `target` exist, built by `build(staging_dir)` and published by renaming the staging directory.

    Returns what `build` returned on the builder, None elsewhere or when `target` was already complete.

    - `builder`: this process builds. The others wait on the file system (never on a collective that could
      time out during a long build) until `is_complete(target)`, or until the builder's failure marker
      appears, and then raise the builder's message as a UserError.
    - `collective`: every process runs `build` into the same `staging` directory, each writing its own
      part (every rank's share of a checkpoint); `build` synchronises them before it returns. Only the
      builder publishes; the others return after their part.
    - `staging`: the directory `build` writes into. Default: a sibling private to this process.
    - `replace`: an existing target is replaced (a checkpoint of the same step, final/). Without it an
      existing complete target is reused, and a concurrent builder that published first wins.
    - `waiters`: other processes may be waiting on the file system, so a failed build leaves its error in
      the failure marker for them. False where nobody polls (checkpoints, final/).
    A failed build removes the staging directory.
    """
    if not replace and is_complete(target):
        return None
    marker = failure_marker(target)
    if collective and not builder:
        return build(staging)
    if not builder:
        while not is_complete(target):
            if marker.is_file():
                raise UserError(marker.read_text())
            time.sleep(poll_sec)
        return None
    if waiters:
        marker.unlink(missing_ok=True)
    staging = staging or target.with_name(f"{STAGING_PREFIX}{target.name}-{os.getpid()}")
    try:
        result = build(staging)
        if replace and target.exists():
            shutil.rmtree(target)
        try:
            os.rename(staging, target)
        except OSError:
            if not is_complete(target):  # not a concurrent builder that got there first
                raise
        return result
    except BaseException as e:
        if not waiters:
            raise
        # Waiting processes raise this text; a UserError is already worded for the user.
        marker.write_text(str(e) if isinstance(e, UserError) else f"building {target} failed: {type(e).__name__}: {e}")
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fresh_dir(path: Path) -> Path:
    """`path` as an empty directory (a staging directory left by a process that died is cleared)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
