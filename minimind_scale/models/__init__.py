"""Models: size presets on transformers' Qwen3 classes, attention kernels, YaRN, import, export, tokenizer training."""
from __future__ import annotations

import importlib

# The names the flat layout's `minimind_scale.models` module held, still importable from here (loaded on first use).
_MOVED_NAMES = frozenset({
    'DEFAULT_TOKENIZER', 'QUERY_HEADS', 'minimind_intermediate_size', 'preset_config', 'load_tokenizer',
    'is_model_dir', 'check_model_source', 'build_model', 'count_parameters', 'save_hf',
})


def __getattr__(name: str):
    if name not in _MOVED_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("minimind_scale.models.build"), name)
