"""The tokenised-data cache: where it lives, the key that names an entry, and writing Arrow data sets into it.

An entry's name is a hash of everything that changes its tokens (the files' bytes, the tokenizer, the
stage and its data fields, max_seq_len), so a changed input can never reuse a stale entry.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import datasets

# Bump when the cached layout or the encoding wrapper changes, so stale caches are never reused.
CACHE_FORMAT = 1
# Data sets larger than this are copied into the cache by a helper process (see save_to_cache).
SAVE_IN_HELPER_BYTES = 256 << 20


def cache_root(cfg) -> Path:
    root = cfg.cache_dir or os.environ.get("MINIMIND_SCALE_CACHE") or Path.home() / ".cache" / "minimind_scale"
    return Path(root) / "datasets"


def file_fingerprint(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update((tokenizer.chat_template or "").encode())
    return h.hexdigest()


def cache_key(spec, cfg, tokenizer, files: list[Path]) -> str:
    from . import __version__

    parts = {
        "format": CACHE_FORMAT,
        "version": __version__,
        "stage": spec.name,
        "files": [file_fingerprint(p) for p in files],
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
