"""The tokenised-data cache: where it lives, the key that names an entry, and writing Arrow data sets into it.

An entry's name is a hash of everything that changes its tokens (the files' bytes, the tokenizer, the
stage and its data fields, max_seq_len), so a changed input can never reuse a stale entry.

A data file's content hash is remembered beside the cache (``<cache>/fingerprints/``) with the file's
device, inode, size, modification time and status-change time (ctime), and reused while all five are
unchanged, so a cache hit does not read the data again. Any write to a file moves its mtime and ctime to
the current time, and setting the mtime back (touch, utime) moves the ctime, which nothing but the clock
can set back; a replaced file has a new inode. The hash is remembered only for a file whose times were
already `RACY_SECONDS` old when hashing began and whose stat did not change while it was read, so a
write within one tick of the file system's clock after hashing cannot go unseen.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

import datasets

# Bump when the cached layout or the encoding wrapper changes, so stale caches are never reused.
CACHE_FORMAT = 2
# Data sets larger than this are copied into the cache by a helper process (see save_to_cache).
SAVE_IN_HELPER_BYTES = 256 << 20


def cache_root(cfg) -> Path:
    root = cfg.cache_dir or os.environ.get("MINIMIND_SCALE_CACHE") or Path.home() / ".cache" / "minimind_scale"
    return Path(root) / "datasets"


# A remembered hash is trusted only for a file whose mtime and ctime were this much older than the start
# of hashing: coarse file-system clocks (1-2 s on some) could otherwise give a rewrite the same times.
RACY_SECONDS = 2.0
_MEMO_VERSION = 1  # bump with the hash below


def fingerprint_dir(cfg) -> Path:
    """Where data files' content hashes are remembered: beside the data sets, in the same cache."""
    return cache_root(cfg).parent / "fingerprints"


def _hash_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def file_fingerprint(path: Path, memo_dir: Path | None = None) -> str:
    """The content hash of a file (blake2b-128 of its bytes). With `memo_dir`, the hash remembered there for
    this file is returned while the file's device, inode, size, mtime and ctime are those it was hashed
    with; otherwise the file is read, and its hash remembered when that is safe (module docstring)."""
    if memo_dir is None:
        return _hash_file(path)
    path = Path(path).resolve()
    before = _stamp(os.stat(path))
    memo = Path(memo_dir) / f"{hashlib.blake2b(str(path).encode(), digest_size=16).hexdigest()}.json"
    try:
        known = json.loads(memo.read_text())
        if known["version"] == _MEMO_VERSION and known["path"] == str(path) and known["stat"] == before:
            return known["hash"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    started = time.time_ns()
    digest = _hash_file(path)
    settled = max(before[3], before[4]) < started - int(RACY_SECONDS * 1e9)
    if settled and _stamp(os.stat(path)) == before:
        _remember(memo, {"version": _MEMO_VERSION, "path": str(path), "stat": before, "hash": digest})
    return digest


def _remember(memo: Path, entry: dict) -> None:
    """Write `entry` to `memo` atomically; a cache that cannot be written only loses the shortcut."""
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}.{time.monotonic_ns()}")
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, memo)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update((tokenizer.chat_template or "").encode())
    return h.hexdigest()


def cache_key(spec, cfg, tokenizer, files: list[Path]) -> str:
    from minimind_scale import __version__

    parts = {
        "format": CACHE_FORMAT,
        "version": __version__,
        "stage": spec.name,
        "files": [file_fingerprint(p, fingerprint_dir(cfg)) for p in files],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_seq_len": cfg.max_seq_len,
        "skip_bad_records": cfg.skip_bad_records,
        "stage_fields": {f: getattr(cfg, f) for f in spec.data_fields},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@contextlib.contextmanager
def datasets_progress(enabled: bool):
    """datasets' progress bars on or off for a block, then as they were. Only long steps (tokenising,
    packing) show one; reading, filtering and saving are quick."""
    before = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if before else datasets.disable_progress_bars)()


def save_to_cache(dataset: datasets.Dataset, path: Path) -> None:
    """`save_to_disk`; a large copy runs in a helper process, one shard at a time, so the memory-mapped
    pages it reads are released with each shard instead of piling up in this process's resident memory."""
    dataset.save_to_disk(str(path), num_proc=1 if dataset.data.nbytes > SAVE_IN_HELPER_BYTES else None)
