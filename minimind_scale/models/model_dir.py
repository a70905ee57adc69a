"""Checking a model or LoRA adapter directory before a command spends time on anything else.

A damaged directory (no weights, a cut-off download, a hand-edited config) would otherwise fail deep inside
transformers or safetensors with a traceback, often after the data was tokenised. The checks here read only
small things: config.json, the index of a sharded model, and each weights file's header and size.
"""
from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from minimind_scale.errors import UserError

CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
SINGLE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
HEADER_LENGTH_BYTES = 8  # a safetensors file opens with its JSON header's length, a little-endian u64


def check_model_dir(path, what: str = "--model", need_weights: bool = True, adapter: bool = False) -> None:
    """Raise a UserError naming `what` (the option), the directory and the problem unless `path` is a model
    directory (an adapter directory when `adapter`) whose config loads and whose weights are whole."""
    directory = Path(path)
    kind = "adapter" if adapter else "model"
    if not directory.exists():
        hint = "not a LoRA adapter directory" if adapter else "not a Hugging Face model directory"
        raise UserError(f"{what} {path}: {kind} directory not found ({hint})")
    if not directory.is_dir():
        raise UserError(f"{what} {path}: not a directory (a {kind} is a directory holding config and weights)")
    if adapter:
        _check_adapter_config(directory, what)
    else:
        _check_model_config(directory, what)
    if need_weights:
        for weights in _weight_files(directory, what, ADAPTER_WEIGHTS if adapter else SINGLE_WEIGHTS):
            _check_weights_file(weights, what)


def _read_json(file: Path, what: str):
    """The parsed JSON of `file`; unreadable or invalid JSON is a UserError saying where."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {file}: cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {file}:{e.lineno}: not valid JSON ({e.msg})") from None


def _require_json_object(directory: Path, name: str, kind: str, what: str) -> None:
    """`directory/name` exists and holds a JSON object; else UserError saying the directory is not a `kind`."""
    file = directory / name
    if not file.is_file():
        raise UserError(f"{what} {directory}: not a {kind} directory (no {name})")
    if not isinstance(_read_json(file, what), dict):
        raise UserError(f"{what} {file}: not a JSON object")


def _check_adapter_config(directory: Path, what: str) -> None:
    _require_json_object(directory, ADAPTER_CONFIG, "LoRA adapter", what)


def _check_model_config(directory: Path, what: str) -> None:
    """config.json exists, is a JSON object, and transformers builds a config from it (field types included)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    _require_json_object(directory, CONFIG, "Hugging Face model", what)
    try:
        AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, TypeError, KeyError, StrictDataclassError) as e:
        # transformers' messages run to several lines of advice; the first two say what is wrong.
        reason = " ".join(str(e).strip().splitlines()[:2])
        raise UserError(f"{what} {directory / CONFIG}: not a usable model config "
                        f"({type(e).__name__}: {reason})") from None


def _weight_files(directory: Path, what: str, single_names: tuple[str, ...]) -> list[Path]:
    """The weights files the directory's loader will read: one single file, else the shards an index lists."""
    for name in single_names:
        if (directory / name).is_file():
            return [directory / name]
    for name in SHARD_INDEXES:
        if (directory / name).is_file():
            return _shards(directory / name, what)
    raise UserError(f"{what} {directory}: no weights (none of {', '.join(single_names + SHARD_INDEXES)}); "
                    "the directory holds a config but no model")


def _shards(index: Path, what: str) -> list[Path]:
    """The shard files named by a sharded model's index, each of which must exist."""
    data = _read_json(index, what)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{what} {index}: no 'weight_map' naming the shards")
    shards = [index.parent / name for name in sorted(set(map(str, weight_map.values())))]
    for shard in shards:
        if not shard.is_file():
            raise UserError(f"{what} {index}: lists the shard {shard.name}, which is missing")
    return shards


def _check_weights_file(file: Path, what: str) -> None:
    if file.suffix == ".safetensors":
        _check_safetensors(file, what)
    elif not zipfile.is_zipfile(file):  # torch.save writes a zip; a cut-off one loses its closing directory
        raise UserError(f"{what} {file}: not a complete PyTorch weights file (truncated or damaged)")


def _check_safetensors(file: Path, what: str) -> None:
    """The header parses and the file is exactly as long as the header says: a cut anywhere is caught
    without reading the tensors."""
    from safetensors import SafetensorError, safe_open

    expected = _safetensors_length(file, what)
    actual = file.stat().st_size
    if actual != expected:
        state = "truncated" if actual < expected else "longer than its header says"
        raise UserError(f"{what} {file}: damaged weights file, {state} ({actual} bytes, the header "
                        f"describes {expected})")
    try:
        with safe_open(str(file), framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise UserError(f"{what} {file}: damaged weights file ({e})") from None


def _safetensors_length(file: Path, what: str) -> int:
    """The file length a safetensors header implies: length prefix + header + the end of the last tensor."""
    damaged = f"{what} {file}: damaged weights file"
    with open(file, "rb") as f:
        prefix = f.read(HEADER_LENGTH_BYTES)
        if len(prefix) < HEADER_LENGTH_BYTES:
            raise UserError(f"{damaged}, truncated inside its header ({len(prefix)} bytes)")
        (header_length,) = struct.unpack("<Q", prefix)
        raw = f.read(header_length) if header_length <= file.stat().st_size else b""
    if len(raw) != header_length:
        raise UserError(f"{damaged}, truncated inside its header (it declares {header_length} header bytes)")
    try:
        header = json.loads(raw)
        data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
                       default=0)
    except (ValueError, TypeError, KeyError, IndexError):
        raise UserError(f"{damaged}, its header is not valid safetensors JSON") from None
    return HEADER_LENGTH_BYTES + header_length + int(data_end)
