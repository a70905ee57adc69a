"""Data: jsonl records to cached, tokenised rows, packing, the resumable loader and batch padding."""
from __future__ import annotations

import importlib

# The names the flat layout's `minimind_scale.data` module held, still importable from here (loaded on first use).
_MOVED_NAMES = frozenset({
    'MAX_REPORTED_ERRORS', 'DATA_REPORT', 'check_data_files', 'DataReport', 'build_dataset', 'is_built',
    'prepare_dataset',
})


def __getattr__(name: str):
    if name not in _MOVED_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("minimind_scale.data.prepare"), name)
