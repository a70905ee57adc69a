"""The output directory of a training run: checked before any work, and owned by one run at a time.

`check_out_dir` refuses, before the (possibly long) tokenisation, an out_dir that is a file, lies under a file or
cannot be written. `hold_out_dir` then takes an exclusive lock on it for the whole run, so that a second run
started into the same directory exits at once instead of interleaving its config.yaml, metrics.jsonl and final/
with the first's. The lock is the file `out_dir/.lock`, holding who owns it (host, PID, start time), and an
flock(2) on that file held by the owning process: the kernel drops the flock when the process dies, however it
dies, which is how a lock left behind by a dead run is told from one in use.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import socket
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from minimind_scale.errors import UserError

LOCK_NAME = ".lock"


def check_out_dir(out_dir: str | Path) -> None:
    """Refuse an out_dir this run could not write into, changing nothing on disk: it must be a directory, or
    be creatable below its nearest existing ancestor; an existing out_dir and its checkpoints/ must be
    writable."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out_dir {path} is a file, not a directory: choose another --out_dir.")
    ancestor = nearest_existing(path)
    if not ancestor.is_dir():
        raise UserError(f"--out_dir {path} cannot be created: {ancestor} is a file, not a directory.")
    check_writable(ancestor, f"--out_dir {path} cannot be created: its parent {ancestor}" if ancestor != path
                   else f"--out_dir {path}")
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir():
        check_writable(checkpoints, f"the checkpoint directory {checkpoints}")


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its closest ancestor that does (a file or a directory)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(directory: Path, what: str) -> None:
    """Refuse a directory that cannot take a new file. Asked twice: os.access for the permission bits, then a
    real probe file (removed at once) for what the bits do not tell: a read-only mount, a quota, an ACL."""
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UserError(f"{what} is not writable (permission denied): choose another --out_dir or fix its "
                        "permissions.")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise UserError(f"{what} is not writable ({e.strerror or e}): choose another --out_dir.") from None


@dataclass(frozen=True)
class Holder:
    """Who holds an out_dir: what the lock file says."""

    host: str
    pid: int
    started: str

    @classmethod
    def of_this_process(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), datetime.now().astimezone().isoformat(timespec="seconds"))

    @classmethod
    def read(cls, fd: int) -> Holder:
        """The holder recorded in an open lock file; an unreadable one names an unknown host, so it is never
        taken over."""
        try:
            fields = json.loads(os.pread(fd, 4096, 0))
            return cls(str(fields["host"]), int(fields["pid"]), str(fields["started"]))
        except (ValueError, KeyError, TypeError):
            return cls("an unknown host", 0, "at an unknown time")

    def describe(self) -> str:
        return f"host {self.host}, PID {self.pid}, started {self.started}"

    def is_running(self) -> bool:
        """Whether a process with this PID exists on this host (it may be another program reusing the PID)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class OutDirLock:
    """The lock this process holds on an out_dir: released (file removed) by `release`, at the latest at exit."""

    def __init__(self, out_dir: Path, fd: int, created: Path | None):
        self.path = out_dir / LOCK_NAME
        self.fd = fd
        self.created = created  # the topmost directory this run created for out_dir, if any
        atexit.register(self.release)

    def release(self) -> None:
        """Remove the lock file (only if it is still ours) and any directory this run created that stayed
        empty, then drop the flock. Safe to call twice."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            if same_file(self.fd, self.path):
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1
        _HELD.pop(str(self.path), None)
        if self.created is not None:
            remove_if_empty(self.path.parent, self.created)
        atexit.unregister(self.release)


_HELD: dict[str, OutDirLock] = {}  # by lock path: a run in this process that ended by an exception keeps its lock


def hold_out_dir(out_dir: str | Path, say) -> OutDirLock:
    """Create out_dir if needed and lock it for this process; exit 2 (UserError) naming the holder if another
    run holds it. A refused run leaves out_dir as it found it: it existed already, since its holder made it."""
    path = Path(out_dir)
    earlier = _HELD.get(str(path / LOCK_NAME))
    if earlier is not None:  # an earlier run in this process ended without releasing
        earlier.release()
    try:
        created = make_dirs(path)
    except OSError as e:
        raise UserError(f"--out_dir {path} cannot be created ({e.strerror or e}): choose another --out_dir.") from None
    try:
        lock = OutDirLock(path, take_lock(path / LOCK_NAME, say), created)
    except BaseException as e:
        if created is not None:
            remove_if_empty(path, created)
        if isinstance(e, OSError):
            raise UserError(f"cannot lock --out_dir {path}: {e.filename}: {e.strerror or e}") from None
        raise
    _HELD[str(lock.path)] = lock
    return lock


def make_dirs(path: Path) -> Path | None:
    """mkdir -p; returns the topmost directory that did not exist before, or None."""
    missing = Path(os.path.abspath(path))
    if missing.exists():
        return None
    while not missing.parent.exists():
        missing = missing.parent
    path.mkdir(parents=True, exist_ok=True)
    return missing


def remove_if_empty(path: Path, top: Path) -> None:
    """rmdir `path` and its ancestors up to `top`, stopping at the first that is not empty."""
    path = Path(os.path.abspath(path))
    while True:
        try:
            path.rmdir()
        except OSError:
            return
        if path == top:
            return
        path = path.parent


def take_lock(lock_path: Path, say) -> int:
    """An open, flocked descriptor of `lock_path`, which now names this process. The new lock is written and
    flocked under a private name, then published by link(2), which fails if a lock exists: so a lock file is
    never seen half-written or unlocked. An existing one is taken over only when stale (see `take_over`)."""
    fd, draft = write_draft(lock_path)
    try:
        for _ in range(3):  # a lock that vanishes or is replaced while being inspected is looked at again
            try:
                os.link(draft, lock_path)
                return fd
            except FileExistsError:
                if take_over(lock_path, draft, say):
                    return fd
        raise UserError(f"{lock_path.parent} is being locked and unlocked by other runs: try again.")
    except BaseException:
        os.close(fd)
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(draft)


def write_draft(lock_path: Path) -> tuple[int, str]:
    """This process's lock, written and flocked under a private name beside `lock_path`."""
    draft = f"{lock_path}.{os.getpid()}"
    fd = os.open(draft, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)  # the name is this PID's
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps(Holder.of_this_process().__dict__).encode())
    return fd, draft


def take_over(lock_path: Path, draft: str, say) -> bool:
    """Replace an existing lock by `draft` if it is stale: no process holds its flock and it was written on
    this host. UserError if it is in use, or written on another host (whose processes cannot be seen from
    here); False if it changed meanwhile."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        holder = Holder.read(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{lock_path.parent} is in use by another run ({holder.describe()}; lock file "
                            f"{lock_path}): wait for it to end, or choose another --out_dir.") from None
        if holder.host != socket.gethostname():
            raise UserError(f"{lock_path.parent} is locked by a run on {holder.describe()}, which cannot be "
                            f"checked from this host: if that run has ended, remove {lock_path}.")
        if not same_file(fd, lock_path):
            return False
        os.replace(draft, lock_path)
    finally:
        os.close(fd)
    reason = "has ended" if not holder.is_running() else "no longer holds it (its PID is reused)"
    say(f"taking over the stale lock {lock_path}: the run that left it ({holder.describe()}) {reason}")
    return True


def same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
