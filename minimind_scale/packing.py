"""Packing: several tokenised samples per row, each with its own restarting position ids.

Rows are planned by best-fit decreasing from the length column alone (one int per sample), then
materialised by ``datasets.map`` over a small data set of bins (each row: the sample indices it
holds), so the token data never has to fit in memory at once.

The loss is unchanged by packing (DESIGN §7): transformers derives a block-diagonal causal mask from
position ids that restart at 0 when the forward has no attention mask and no cache, and the first
label of every sample after the first in a row is set to -100 — unpacked, that token is never a
prediction target (nothing precedes it), while packed it would be "predicted" from the end of the
previous sample.
"""
from __future__ import annotations

import bisect
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import datasets
import numpy as np
import pyarrow.compute as pc

IGNORE_INDEX = -100
PACKED_COLUMNS = ("input_ids", "labels", "position_ids")
REPORT_FILE = "packing_report.json"


@dataclass
class PackingReport:
    samples: int
    rows: int
    tokens: int
    max_seq_len: int

    @property
    def efficiency(self) -> float:
        """Real tokens over the token slots of the rows at full length."""
        return self.tokens / max(1, self.rows * self.max_seq_len)

    def summary(self) -> str:
        return (f"packed {self.samples} samples into {self.rows} rows of <= {self.max_seq_len} tokens "
                f"(efficiency {self.efficiency:.1%})")


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices, each summing to at most `capacity` tokens.

    Longest samples first (ties by index), each into the open bin whose free space is the smallest
    that still fits it. Deterministic, so every rank plans the same rows.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"sample lengths must lie in [1, {capacity}]")
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    bins: list[list[int]] = []
    # Free space -> the bins with exactly that much left. The distinct free-space values (at most
    # `capacity` of them) are kept sorted, so finding the best fit is one bisect, not a scan of bins.
    by_free: dict[int, list[int]] = {}
    free_values: list[int] = []
    for i in order.tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(free_values, n)
        if k < len(free_values):
            free = free_values[k]
            b = by_free[free].pop()
            if not by_free[free]:
                del by_free[free]
                free_values.pop(k)
        else:
            free, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        left = free - n
        if left > 0:
            if left not in by_free:
                by_free[left] = []
                bisect.insort(free_values, left)
            by_free[left].append(b)
    return bins


def _materialise(batch: dict, source: datasets.Dataset) -> dict:
    out = {c: [] for c in PACKED_COLUMNS}
    flat = [i for members in batch["members"] for i in members]
    rows = source[flat] if flat else {"input_ids": [], "labels": []}
    at = 0
    for members in batch["members"]:
        ids, labels, pos = [], [], []
        for k in range(len(members)):
            sample_ids, sample_labels = rows["input_ids"][at], list(rows["labels"][at])
            at += 1
            if k > 0:
                sample_labels[0] = IGNORE_INDEX
            ids.extend(sample_ids)
            labels.extend(sample_labels)
            pos.extend(range(len(sample_ids)))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(pos)
    return out


def pack_dataset(dataset: datasets.Dataset, max_seq_len: int, num_proc: int = 1,
                 cache_file: Optional[str] = None) -> tuple[datasets.Dataset, PackingReport]:
    """`dataset` (columns input_ids, labels) packed into rows of at most `max_seq_len` tokens.

    `cache_file`: where the packed rows are written; without it they are built in memory.
    """
    extra = set(dataset.column_names) - {"input_ids", "labels"}
    if extra or "input_ids" not in dataset.column_names or "labels" not in dataset.column_names:
        raise ValueError(f"packing needs exactly the columns input_ids and labels, got {dataset.column_names}")
    # Lengths straight from the Arrow list column: no token is decoded into Python objects.
    lengths = pc.list_value_length(dataset.with_format("arrow")[:]["input_ids"]).to_numpy(zero_copy_only=False)
    bins = best_fit_decreasing(lengths, max_seq_len)
    plan = datasets.Dataset.from_dict({"members": bins},
                                      features=datasets.Features({"members": datasets.Sequence(datasets.Value("int64"))}))
    features = datasets.Features({c: datasets.Sequence(datasets.Value("int32")) for c in PACKED_COLUMNS})
    num_proc = max(1, min(num_proc, len(bins) // 2000))
    packed = plan.map(_materialise, batched=True, batch_size=200, remove_columns=["members"], features=features,
                      fn_kwargs={"source": dataset.select_columns(["input_ids", "labels"])},
                      num_proc=num_proc if num_proc > 1 else None, cache_file_name=cache_file, desc="packing")
    report = PackingReport(samples=len(lengths), rows=len(bins), tokens=int(lengths.sum()), max_seq_len=max_seq_len)
    return packed, report


def prepare_packed(spec, cfg, unpacked_dir: Path, is_local_main: bool = True, log=print) -> datasets.Dataset:
    """The packed variant of the cached data set in `unpacked_dir`, cached beside it as `<dir>-packed`.

    Built once under a temporary name, then renamed, like the unpacked cache; other local ranks wait
    for it on the file system.
    """
    from .errors import UserError

    target = unpacked_dir.with_name(unpacked_dir.name + "-packed")
    failed = target.with_name(target.name + ".failed")
    done = target / REPORT_FILE
    if not done.is_file():
        if is_local_main:
            failed.unlink(missing_ok=True)
            try:
                _build_packed(spec, cfg, unpacked_dir, target)
            except BaseException as e:
                failed.write_text(f"packing {unpacked_dir} failed: {type(e).__name__}: {e}")
                if isinstance(e, ValueError):
                    raise UserError(f"stage '{spec.name}': {e}") from None
                raise
        else:
            while not done.is_file():
                if failed.is_file():
                    raise UserError(failed.read_text())
                time.sleep(1.0)
    report = PackingReport(**json.loads(done.read_text()))
    log(f"{report.summary()} -> {target}")
    return datasets.load_from_disk(str(target))


def _build_packed(spec, cfg, unpacked_dir: Path, target: Path) -> None:
    work = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        datasets.disable_progress_bars()
        source = datasets.load_from_disk(str(unpacked_dir))
        packed, report = pack_dataset(source, cfg.max_seq_len, cfg.num_proc, cache_file=str(work / "rows.arrow"))
        packed.save_to_disk(str(work / "final"))
        (work / "final" / REPORT_FILE).write_text(json.dumps(report.__dict__, indent=1))
        try:
            os.rename(work / "final", target)
        except OSError:
            if not (target / REPORT_FILE).is_file():  # not a concurrent writer that got there first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        datasets.enable_progress_bars()
