"""jsonl → tokenised, memory-mapped Arrow data sets, cached by content; samplers and padding collation.

Every line is parsed, validated and encoded inside ``datasets.map`` worker processes. A bad record
never raises inside a worker: it yields an ``_error`` text, so the main process can report the
first problems with file and line, or skip them when the user asked for that.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import DistributedSampler

from .attention import varlen_boundaries
from .errors import RecordError, UserError

# Bump when the cached layout or the encoding wrapper changes, so stale caches are never reused.
CACHE_FORMAT = 1
MAX_REPORTED_ERRORS = 10
# Data sets larger than this are copied into the cache by a helper process (see save_to_cache).
SAVE_IN_HELPER_BYTES = 256 << 20
IGNORE_INDEX = -100
# A well-formed sample whose loss-bearing part lies beyond max_seq_len: it would train nothing, so it
# is dropped and counted, not treated as malformed.
NO_LOSS = "no loss-bearing token"


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


def check_data_files(paths: list[str]) -> list[Path]:
    if not paths:
        raise UserError("no data: give --data_path FILE [FILE ...]")
    files = [Path(p) for p in paths]
    for p in files:
        if p.is_dir():
            raise UserError(f"{p} is a directory; --data_path takes jsonl files")
        if not p.is_file():
            raise UserError(f"data file not found: {p}")
        if not _has_a_record(p):
            raise UserError(f"{p}: the data file is empty (no non-blank line)")
    return files


def _has_a_record(path: Path) -> bool:
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


def _read_lines(path: str) -> Iterator[dict]:
    """Raw lines as bytes with 1-based numbers; decoding waits for the workers (and may fail there)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield {"line": number, "raw": line}


def _line_spans(path: str) -> Iterator[dict]:
    """Where each non-blank line lies in the file (1-based number, byte offset, byte length): the
    workers read the bytes themselves, so no copy of the corpus is written to Arrow and memory-mapped."""
    with open(path, "rb") as f:
        offset = 0
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield {"line": number, "offset": offset, "length": len(line)}
            offset += len(line)


def _encode_spans(batch: dict, path: str, encode, tokenizer, cfg, columns: list[str]) -> dict:
    """`_encode_rows` over the lines of one batch of `_line_spans`, read from `path` in one go."""
    start = min(batch["offset"])
    with open(path, "rb") as f:
        f.seek(start)
        block = f.read(max(o + n for o, n in zip(batch["offset"], batch["length"])) - start)
    raw = [block[o - start:o - start + n] for o, n in zip(batch["offset"], batch["length"])]
    return _encode_rows({"line": batch["line"], "raw": raw}, encode, tokenizer, cfg, columns)


def _encode_rows(batch: dict, encode, tokenizer, cfg, columns: list[str]) -> dict:
    out: dict[str, list] = {c: [] for c in columns}
    out["_error"], out["_line"] = [], []
    for number, raw in zip(batch["line"], batch["raw"]):
        encoded, error = None, ""
        try:
            record = json.loads(raw.decode("utf-8").rstrip("\r\n"))
            if not isinstance(record, dict):
                raise RecordError("record", "a line must hold one JSON object")
            encoded = encode(record, tokenizer, cfg)
            if "labels" in encoded and all(x == IGNORE_INDEX for x in encoded["labels"]):
                raise RecordError("labels", f"{NO_LOSS} within max_seq_len {cfg.max_seq_len}")
        except UnicodeDecodeError as e:
            error = f"not UTF-8 text (bad byte at offset {e.start})"
        except json.JSONDecodeError as e:
            error = f"not valid JSON: {e.msg} (column {e.colno})"
        except RecordError as e:
            error = f"field '{e.field}': {e.reason}"
        for c in columns:
            out[c].append(encoded[c] if error == "" else [])
        out["_error"].append(error)
        out["_line"].append(number)
    return out


def _probe_columns(path: Path, encode, tokenizer, cfg, limit: int = 1000) -> list[str]:
    """Column names of the stage's encoding, from the first record that encodes."""
    for row in _read_lines(str(path)):
        if row["line"] > limit:
            break
        try:
            return sorted(encode(json.loads(row["raw"].decode("utf-8")), tokenizer, cfg))
        except (ValueError, UnicodeDecodeError, AttributeError, TypeError):
            continue
    return ["input_ids", "labels"]


@dataclass
class DataReport:
    records: int
    skipped: int
    reasons: dict[str, int]
    too_long: int = 0  # dropped: no loss-bearing token within max_seq_len
    tokens: int = 0    # tokens over every *input_ids column (before packing)

    def summary(self) -> str:
        text = f"{self.records} records" + (f", {self.tokens:,} tokens" if self.tokens else "")
        if self.too_long:
            text += f", {self.too_long} dropped with no loss-bearing token within max_seq_len"
        if self.skipped:
            text += f", {self.skipped} malformed skipped (" + ", ".join(f"{k}: {v}" for k, v in self.reasons.items()) + ")"
        return text


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


def _encode_file(path: Path, spec, cfg, tokenizer, work_dir: Path, columns: list[str]) -> datasets.Dataset:
    # Only line numbers and byte spans go to Arrow: a worker reading a memory-mapped copy of the raw
    # text would keep every page it touched resident, about (file size / num_proc) each.
    with datasets_progress(False):
        raw = datasets.Dataset.from_generator(
            _line_spans, gen_kwargs={"path": str(path)}, cache_dir=str(work_dir / "raw"),
            features=datasets.Features({k: datasets.Value("int64") for k in ("line", "offset", "length")}),
        )
    features = datasets.Features({c: datasets.Sequence(datasets.Value("int32")) for c in columns})
    features["_error"] = datasets.Value("string")
    features["_line"] = datasets.Value("int64")
    # Small files are faster in one process than in a pool that must start up.
    num_proc = max(1, min(cfg.num_proc, math.ceil(len(raw) / 2000)))
    with datasets_progress(True):
        return raw.map(
            _encode_spans, batched=True, batch_size=500, num_proc=num_proc if num_proc > 1 else None,
            remove_columns=raw.column_names, features=features,
            fn_kwargs=dict(path=str(path), encode=spec.encode, tokenizer=tokenizer, cfg=cfg, columns=columns),
            desc=f"tokenising {path.name}",
        )


def _collect_errors(parts: list[tuple[Path, datasets.Dataset]]) -> tuple[list[str], Counter, int, int]:
    """(first problems as file:line texts, count per reason, malformed count, dropped-as-too-long count)."""
    shown, reasons, malformed, no_loss = [], Counter(), 0, 0
    for path, ds in parts:
        bad = ds.select_columns(["_error", "_line"]).filter(lambda e: e != "", input_columns="_error")
        for row in bad:
            if NO_LOSS in row["_error"]:
                no_loss += 1
                continue
            malformed += 1
            reasons[row["_error"].split(":")[0]] += 1
            if len(shown) < MAX_REPORTED_ERRORS:
                shown.append(f"{path}:{row['_line']}: {row['_error']}")
    return shown, reasons, malformed, no_loss


def save_to_cache(dataset: datasets.Dataset, path: Path) -> None:
    """`save_to_disk`; a large copy runs in a helper process, one shard at a time, so the memory-mapped
    pages it reads are released with each shard instead of piling up in this process's resident memory."""
    dataset.save_to_disk(str(path), num_proc=1 if dataset.data.nbytes > SAVE_IN_HELPER_BYTES else None)


def build_dataset(spec, cfg, tokenizer, files: list[Path], target: Path) -> DataReport:
    """Encode every file into `target` (written under a temporary name, then renamed)."""
    work = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        columns = _probe_columns(files[0], spec.encode, tokenizer, cfg)
        parts = [(p, _encode_file(p, spec, cfg, tokenizer, work, columns)) for p in files]
        with datasets_progress(False):
            return _finish_dataset(parts, cfg, files, work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _finish_dataset(parts: list[tuple[Path, datasets.Dataset]], cfg, files: list[Path], work: Path,
                    target: Path) -> DataReport:
    """Report or drop the bad records, save the rest, and move the result into place."""
    shown, reasons, n_bad, n_no_loss = _collect_errors(parts)
    n_all = sum(len(ds) for _, ds in parts)
    if n_bad and not cfg.skip_bad_records:
        more = f"\n... and {n_bad - len(shown)} more" if n_bad > len(shown) else ""
        raise UserError(f"{n_bad} of {n_all} records are malformed (set skip_bad_records true to skip them):\n"
                        + "\n".join(shown) + more)
    merged = datasets.concatenate_datasets([ds for _, ds in parts])
    if n_bad or n_no_loss:
        merged = merged.filter(lambda e: e == "", input_columns="_error")
    if len(merged) == 0:
        raise UserError(f"no usable record in {', '.join(map(str, files))}")
    merged = merged.remove_columns(["_error", "_line"])
    save_to_cache(merged, work / "final")
    saved = datasets.load_from_disk(str(work / "final"))  # only the kept rows, memory-mapped
    tokens = sum(pc.sum(pc.list_value_length(saved.data.column(c))).as_py() or 0
                 for c in saved.column_names if c.endswith("input_ids"))
    report = DataReport(records=len(merged), skipped=n_bad, reasons=dict(reasons), too_long=n_no_loss,
                        tokens=int(tokens))
    (work / "final" / "data_report.json").write_text(json.dumps(report.__dict__, indent=1))
    try:
        os.rename(work / "final", target)
    except OSError:
        if not (target / "data_report.json").is_file():  # not a concurrent writer that got there first
            raise
    return report


def _wait_for(target: Path, failed: Path, poll: float = 1.0) -> None:
    """Non-main local ranks wait on the file system, not on a collective that could time out."""
    while not (target / "data_report.json").is_file():
        if failed.is_file():
            raise UserError(failed.read_text())
        time.sleep(poll)


def prepare_dataset(spec, cfg, tokenizer, is_local_main: bool = True, log=print) -> tuple[datasets.Dataset, Path, DataReport]:
    """The cached tokenised data set for this stage and config, building it if needed; packed when
    `cfg.packing` is set. The returned path is always the unpacked data set's directory."""
    if getattr(cfg, "packing", False) and not spec.packable:
        raise UserError(f"stage '{spec.name}' cannot pack its rows; set packing false")
    files = check_data_files(cfg.data_path)
    target = cache_root(cfg) / f"{spec.name}-{cache_key(spec, cfg, tokenizer, files)}"
    failed = target.with_name(target.name + ".failed")
    if not (target / "data_report.json").is_file():
        if is_local_main:
            failed.unlink(missing_ok=True)
            try:
                report = build_dataset(spec, cfg, tokenizer, files, target)
            except UserError as e:
                failed.write_text(str(e))
                raise
            log(f"tokenised {report.summary()} -> {target}")
        else:
            _wait_for(target, failed)
    else:
        log(f"using cached tokenised data {target}")
    report = DataReport(**json.loads((target / "data_report.json").read_text()))
    if getattr(cfg, "packing", False):
        from .packing import prepare_packed

        return prepare_packed(spec, cfg, target, is_local_main, log), target, report
    return datasets.load_from_disk(str(target)), target, report


# --------------------------------------------------------------------------- batching


class EpochSampler(DistributedSampler):
    """This rank's shuffled indices for one epoch (seed + epoch), starting after `skip` samples.

    The order depends only on (seed, epoch, world size, and with `lengths` the batch size), which is
    what lets a resumed run continue from the exact sample where the checkpoint was written.

    With `lengths` (one per row) the order is length-grouped: shuffled rows are cut into mega-batches
    of GROUPED_BATCHES global batches, each sorted by length and cut into global batches, whose order
    is shuffled again (the batch holding the longest row goes first, so running out of memory
    happens at step 1, not hours in). Each rank's next `batch_size` rows come from the same global
    batch, so all ranks step on rows of similar length.
    """

    GROUPED_BATCHES = 50

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, epoch: int, skip: int = 0, shuffle: bool = True,
                 lengths: Optional[np.ndarray] = None, batch_size: int = 1):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.set_epoch(epoch)
        self.skip = skip
        self.lengths = lengths
        self.batch_size = batch_size

    def __iter__(self):
        indices = list(super().__iter__()) if self.lengths is None else self._length_grouped()
        return iter(indices[self.skip:])

    def _length_grouped(self) -> list[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        n = len(self.lengths)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        order += order[:self.total_size - n]  # pad as DistributedSampler does, so ranks get equal counts
        global_batch = self.batch_size * self.num_replicas
        mega = global_batch * self.GROUPED_BATCHES
        ranked = [i for start in range(0, len(order), mega)
                  for i in sorted(order[start:start + mega], key=lambda j: -int(self.lengths[j]))]
        batches = [ranked[start:start + global_batch] for start in range(0, len(ranked), global_batch)]
        # A short last global batch stays last, or ranks would take rows from two different batches.
        full = batches if len(batches[-1]) == global_batch else batches[:-1]
        shuffled = [full[k] for k in torch.randperm(len(full), generator=g).tolist()] if self.shuffle else full
        if shuffled:
            longest = max(range(len(shuffled)), key=lambda k: int(self.lengths[shuffled[k][0]]))
            shuffled.insert(0, shuffled.pop(longest))
        flat = [i for b in shuffled + batches[len(full):] for i in b]
        return flat[self.rank:self.total_size:self.num_replicas]

    def __len__(self):
        return max(0, self.num_samples - self.skip)


def row_lengths(dataset: datasets.Dataset) -> np.ndarray:
    """Tokens per row (the longest of its *input_ids columns: a DPO row pads to its longer side)."""
    table = dataset.with_format("arrow")[:]
    columns = [c for c in table.column_names if c.endswith("input_ids")]
    return np.max([pc.list_value_length(table[c]).to_numpy(zero_copy_only=False) for c in columns], axis=0)


def batches_per_epoch(n_rows: int, world: int, batch_size: int) -> int:
    return math.ceil(math.ceil(n_rows / world) / batch_size)


def pad_collate(rows: list[dict[str, Any]], pad_id: int, length: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row of the batch (or to `length`): input_ids with pad_id, labels with -100.

    Packed rows (with position_ids) get position_ids padded with 0 and no attention_mask:
    transformers builds the per-sample causal mask from restarting position ids only when no mask
    is given. Each padding token then counts as a sample of its own, so it is never attended to.
    They also carry their sample boundaries for varlen (flash) attention; see attention.py.
    """
    longest = max([len(r["input_ids"]) for r in rows] + [length or 0])
    packed = "position_ids" in rows[0]
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    extra = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"])
        labels[i, :n] = torch.as_tensor(r["labels"])
        extra[i, :n] = torch.as_tensor(r["position_ids"]) if packed else 1
    # `_tokens` (bookkeeping, not a model input): the real tokens, for throughput and MFU.
    batch = {"input_ids": ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra,
             "_tokens": torch.tensor(sum(len(r["input_ids"]) for r in rows))}
    if packed:
        batch.update(varlen_boundaries(extra, [len(r["input_ids"]) for r in rows]))
    return batch


def to_device(batch: dict, device) -> dict:
    """The batch's tensors moved to `device`; other values (the varlen maximum lengths) as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def padded_length(cfg) -> Optional[int]:
    """The fixed row length of `pad_to max_seq_len` (MiniMind's batches), else None: the batch's longest.
    Packed rows under `compile` are padded to max_seq_len too: they are nearly full anyway, and one
    shape for every step means the graph compiles once."""
    if getattr(cfg, "pad_to", "longest") == "max_seq_len" or (getattr(cfg, "compile", False) and getattr(cfg, "packing", False)):
        return cfg.max_seq_len
    return None


class IndexedRows(torch.utils.data.Dataset):
    """Rows with their position in the data set as `_index`, so a stage can look up per-row state
    it computed once (e.g. DPO's precomputed reference log-probabilities)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {**self.dataset[int(i)], "_index": int(i)}


def make_loader(dataset, collate, batch_size: int, world: int, rank: int, seed: int, epoch: int,
                skip_batches: int = 0, shuffle: bool = True, num_workers: int = 0,
                lengths: Optional[np.ndarray] = None):
    """`lengths` (see row_lengths) switches to length-grouped batches."""
    sampler = EpochSampler(dataset, world, rank, seed, epoch, skip=skip_batches * batch_size, shuffle=shuffle,
                           lengths=lengths, batch_size=batch_size)
    return torch.utils.data.DataLoader(IndexedRows(dataset), batch_size=batch_size, sampler=sampler,
                                       collate_fn=collate, num_workers=num_workers, drop_last=False,
                                       pin_memory=torch.cuda.is_available(), persistent_workers=False)
