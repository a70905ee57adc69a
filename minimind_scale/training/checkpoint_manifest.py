"""What a checkpoint contains: `manifest.json` lists every file with its size and a fast checksum.

The manifest is written last, just before the checkpoint is published, so a resume can verify the files
before loading any of them: a truncated, missing or altered file is named instead of surfacing as a
library error (or, for accelerate's RNG state, not at all).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from minimind_scale.errors import UserError

MANIFEST_FILE = "manifest.json"
CHUNK = 16 * 2**20


class DamagedCheckpoint(UserError):
    """A checkpoint file is missing, truncated or unreadable (``resume auto`` skips such a checkpoint)."""

try:  # xxh3 is an order of magnitude faster than any cryptographic hash; blake2b is always there
    import xxhash

    DEFAULT_ALGORITHM = "xxh3_64"
except ImportError:
    xxhash = None
    DEFAULT_ALGORITHM = "blake2b"


def _hasher(algorithm: str):
    """A fresh hash object for `algorithm`, or None where this machine lacks it."""
    if algorithm == "xxh3_64":
        return xxhash.xxh3_64() if xxhash is not None else None
    if algorithm == "blake2b":
        return hashlib.blake2b(digest_size=16)
    return None


def file_digest(path: Path, algorithm: str) -> str:
    """The hex checksum of one file, read in large chunks."""
    h = _hasher(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def describe_files(root: Path, relative_paths: list[str]) -> list[dict]:
    """One manifest entry (path, size, checksum) per file under `root`."""
    return [{"path": rel, "size": (root / rel).stat().st_size, DEFAULT_ALGORITHM: file_digest(root / rel,
                                                                                              DEFAULT_ALGORITHM)}
            for rel in relative_paths]


def files_under(root: Path) -> list[str]:
    """Every file below `root` as a sorted relative path, the manifest itself excluded."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def share_of(paths: list[str], rank: int, world_size: int) -> list[str]:
    """The files one process hashes: every process takes its own stride, so each file is read once."""
    return paths[rank::world_size]


def write_manifest(root: Path, entries: list[dict], hash_sec: float) -> None:
    """Write the merged manifest; the caller publishes the directory only after this returns."""
    manifest = {"algorithm": DEFAULT_ALGORITHM, "hash_sec": round(hash_sec, 3),
                "files": sorted(entries, key=lambda e: e["path"])}
    (root / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))


@dataclass
class Verified:
    """What verifying a checkpoint found: no manifest (written before manifests existed), or its totals."""
    has_manifest: bool
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        if not self.has_manifest:
            return "no manifest (an older checkpoint): files not verified"
        return f"{self.files} files ({self.bytes / 2**20:.1f} MiB) verified in {self.seconds:.2f}s"


def read_manifest(checkpoint: Path) -> dict | None:
    """The parsed manifest, None where there is none; a damaged one is a UserError."""
    path = checkpoint / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest.get("files")
        if not isinstance(files, list) or not all(isinstance(e, dict) and isinstance(e.get("path"), str)
                                                  and isinstance(e.get("size"), int) for e in files):
            raise ValueError("no list of files with path and size")
        return manifest
    except (ValueError, AttributeError, OSError) as e:
        raise DamagedCheckpoint(f"checkpoint {checkpoint} is damaged: {path} cannot be read ({e})") from None


def entry_problem(checkpoint: Path, entry: dict, algorithm: str) -> str | None:
    """What is wrong with one listed file, or None when its size and checksum match."""
    path = checkpoint / entry["path"]
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{path} is {size} bytes, {entry['size']} were written (truncated or replaced)"
    if _hasher(algorithm) is not None and file_digest(path, algorithm) != entry.get(algorithm):
        return f"{path} has the right size but other contents (its {algorithm} checksum differs)"
    return None


def verify_files(checkpoint: Path) -> Verified:
    """Check every file the manifest lists; the first damaged one is a UserError naming it."""
    manifest = read_manifest(checkpoint)
    if manifest is None:
        return Verified(has_manifest=False)
    started = time.perf_counter()
    algorithm = manifest.get("algorithm", "")
    for entry in manifest["files"]:
        problem = entry_problem(checkpoint, entry, algorithm)
        if problem:
            raise DamagedCheckpoint(f"checkpoint {checkpoint} is damaged: {problem}")
    return Verified(has_manifest=True, files=len(manifest["files"]),
                    bytes=sum(e["size"] for e in manifest["files"]), seconds=time.perf_counter() - started)
