"""Packing: several tokenised samples per row, each with its own restarting position ids.

Rows are planned by best-fit decreasing from the length column alone (one int per sample), then
materialised by ``datasets.map`` over a small data set of bins (each row: the sample indices it
holds), so the token data never has to fit in memory at once.

The loss is unchanged by packing (docs/architecture.md, "Packing isolation"): transformers derives a
block-diagonal causal mask from position ids that restart at 0 when the forward has no attention
mask and no cache, and the first label of every sample after the first in a row is set to -100 —
unpacked, that token is never a prediction target (nothing precedes it), while packed it would be
"predicted" from the end of the previous sample.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from minimind_scale.data.cache import datasets_progress, save_to_cache
from minimind_scale.data.publish import fresh_dir, publish_once
from minimind_scale.data.rows import IGNORE_INDEX, row_lengths
from minimind_scale.errors import UserError

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


def _materialise(batch: dict, source, schema: pa.Schema | None = None) -> pa.Table:
    """The packed rows of a batch of bins, built as whole numpy arrays: each column's tokens are the bins'
    samples concatenated in order (a row's offsets are the running sum of its samples' lengths), the
    label at the start of every sample but a row's first is IGNORE_INDEX, and the position ids count
    from 0 within each sample. Returned as an Arrow table, handed to the writer as it is."""
    members = batch["members"]
    flat = np.fromiter((i for m in members for i in m), dtype=np.int64)
    per_row = np.fromiter((len(m) for m in members), dtype=np.int64, count=len(members))
    cols = _gather(source, flat)
    ids, lengths = cols["input_ids"]
    labels = cols["labels"][0].copy()
    starts = np.cumsum(lengths) - lengths  # where each sample begins in the concatenation
    first = np.cumsum(per_row) - per_row  # each row's first sample
    later = np.ones(len(flat), dtype=bool)
    later[first[per_row > 0]] = False
    labels[starts[later]] = IGNORE_INDEX
    positions = np.arange(len(ids), dtype=np.int32) - np.repeat(starts, lengths).astype(np.int32)
    sample_ends = np.concatenate(([0], np.cumsum(lengths)))
    offsets = sample_ends[np.concatenate(([0], np.cumsum(per_row)))].astype(np.int32)
    types = {f.name: f.type for f in schema} if schema is not None else {}
    arrays = [pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32()),
                                       type=types.get(name, pa.list_(pa.int32())))
              for name, values in zip(PACKED_COLUMNS, (ids, labels, positions))]
    return pa.table(arrays, names=list(PACKED_COLUMNS)) if schema is None else pa.table(arrays, schema=schema)


def _gather(source, indices: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{column: (int32 tokens of the rows at `indices` concatenated in order, each row's length)} for
    input_ids and labels, from a `_FileRows` or a data set."""
    if isinstance(source, _FileRows):
        return source.gather(indices)
    table = source.with_format("arrow")[indices.tolist()] if len(indices) else None
    out = {}
    for c in ("input_ids", "labels"):
        if table is None:
            out[c] = (np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64))
            continue
        col = table.column(c).combine_chunks()
        out[c] = (np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.int32),
                  np.asarray(col.value_lengths().to_numpy(zero_copy_only=False), dtype=np.int64))
    return out


class _FileRows:
    """`rows.gather(indices)` -> {column: (tokens of those rows concatenated, each row's length)} as numpy
    arrays, and `rows[indices]` -> {column: [token list per row]}, for a data set kept in Arrow stream
    files, read with pread rather than through a memory map.

    A bin's samples lie anywhere in the source. Read through a memory map, every page a process
    touches stays resident in it until the map is dropped (on recent kernels a whole large folio,
    often hundreds of kB, per random read), so each packing worker would end up holding about the
    whole source. Here only the list offsets are kept (4 bytes per row and column); tokens are read
    on demand from the page cache.
    """

    def __init__(self, files: list[str], columns: list[str]):
        self.files, self.columns, self._fds = files, columns, None
        first_rows, self.spans, self.offsets, row = [], [], [], 0
        for k, path in enumerate(files):
            with pa.OSFile(path) as f:
                reader = pa.ipc.MessageReader.open_stream(f)
                schema = pa.ipc.read_schema(reader.read_next_message())
                while True:
                    try:
                        message = reader.read_next_message()
                    except StopIteration:
                        break
                    body_at = f.tell() - message.body.size  # the body ends the message
                    batch = pa.ipc.read_record_batch(message, schema)
                    at, offsets = [], []
                    for c in columns:
                        col = batch.column(c)
                        if (col.type != pa.list_(pa.int32()) or col.offset or col.null_count
                                or col.values.offset or col.values.null_count):
                            raise ValueError(f"{path}: column {c} is not a plain list of int32")
                        at.append(body_at + col.buffers()[3].address - message.body.address)
                        offsets.append(col.offsets.to_numpy().copy())  # not a view that keeps the body alive
                    first_rows.append(row)
                    row += batch.num_rows
                    self.spans.append((k, at))
                    self.offsets.append(offsets)
        self.first_rows, self.num_rows = np.asarray(first_rows, dtype=np.int64), row

    @classmethod
    def of(cls, dataset: datasets.Dataset) -> _FileRows | None:
        """A reader for `dataset` when its rows are exactly those of its Arrow files, in order; else None."""
        files = [f["filename"] for f in dataset.cache_files]
        if not files or dataset._indices is not None:
            return None
        try:
            rows = cls(files, dataset.column_names)
        except (OSError, ValueError, KeyError, pa.ArrowException):
            return None
        ends = [0, len(dataset) - 1] if len(dataset) else []
        if rows.num_rows != len(dataset) or rows[ends] != dataset.with_format(None)[ends]:
            return None
        return rows

    def __getitem__(self, indices: list[int]) -> dict[str, list[list[int]]]:
        if self._fds is None:
            self._fds = [os.open(p, os.O_RDONLY) for p in self.files]
        out = {c: [] for c in self.columns}
        for i, b in zip(indices, (np.searchsorted(self.first_rows, indices, side="right") - 1).tolist()):
            k, at = self.spans[b]
            local = i - int(self.first_rows[b])
            for c, start, offsets in zip(self.columns, at, self.offsets[b]):
                lo, hi = int(offsets[local]), int(offsets[local + 1])
                out[c].append(np.frombuffer(os.pread(self._fds[k], 4 * (hi - lo), start + 4 * lo),
                                            dtype="<i4").tolist())
        return out

    def gather(self, indices: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{column: (the tokens of the rows at `indices`, concatenated in order, as int32; each row's
        length)}: one pread per row and column into one buffer, no Python int per token."""
        if self._fds is None:
            self._fds = [os.open(p, os.O_RDONLY) for p in self.files]
        indices = np.asarray(indices, dtype=np.int64)
        blocks = np.searchsorted(self.first_rows, indices, side="right") - 1
        local = indices - self.first_rows[blocks]
        out = {}
        for j, c in enumerate(self.columns):
            lo = np.empty(len(indices), dtype=np.int64)
            hi = np.empty(len(indices), dtype=np.int64)
            for b in np.unique(blocks).tolist():
                at = blocks == b
                offsets = self.offsets[b][j]
                lo[at], hi[at] = offsets[local[at]], offsets[local[at] + 1]
            lengths = hi - lo
            chunks = []
            for b, start, n in zip(blocks.tolist(), lo.tolist(), lengths.tolist()):
                k, at = self.spans[b]
                chunks.append(os.pread(self._fds[k], 4 * n, at[j] + 4 * start))
            out[c] = (np.frombuffer(b"".join(chunks), dtype="<i4").astype(np.int32, copy=False), lengths)
        return out

    def __getstate__(self):
        return {**self.__dict__, "_fds": None}

    def __del__(self):
        for fd in self._fds or []:
            os.close(fd)


def pack_dataset(dataset: datasets.Dataset, max_seq_len: int, num_proc: int = 1,
                 cache_file: str | None = None) -> tuple[datasets.Dataset, PackingReport]:
    """`dataset` (columns input_ids, labels) packed into rows of at most `max_seq_len` tokens.

    `cache_file`: where the packed rows are written; without it they are built in memory.
    """
    extra = set(dataset.column_names) - {"input_ids", "labels"}
    if extra or "input_ids" not in dataset.column_names or "labels" not in dataset.column_names:
        raise ValueError(f"packing needs exactly the columns input_ids and labels, got {dataset.column_names}")
    # Lengths straight from the Arrow list column (row_lengths): no token is decoded into Python objects.
    lengths = row_lengths(dataset)
    bins = best_fit_decreasing(lengths, max_seq_len)
    n_rows = len(bins)
    plan = datasets.Dataset.from_dict(
        {"members": bins}, features=datasets.Features({"members": datasets.Sequence(datasets.Value("int64"))}))
    del bins  # forked workers would each count these Python lists again
    features = datasets.Features({c: datasets.Sequence(datasets.Value("int32")) for c in PACKED_COLUMNS})
    num_proc = max(1, min(num_proc, n_rows // 2000))
    source = dataset.select_columns(["input_ids", "labels"])
    rows = _FileRows.of(source)  # file-backed: read without a memory map
    packed = plan.map(_materialise, batched=True, batch_size=1000, remove_columns=["members"], features=features,
                      fn_kwargs={"source": source if rows is None else rows, "schema": features.arrow_schema},
                      num_proc=num_proc if num_proc > 1 else None, cache_file_name=cache_file, desc="packing")
    report = PackingReport(samples=len(lengths), rows=n_rows, tokens=int(lengths.sum()), max_seq_len=max_seq_len)
    return packed, report


def prepare_packed(spec, cfg, unpacked_dir: Path, is_local_main: bool = True, log=print,
                   rows: np.ndarray | None = None) -> datasets.Dataset:
    """The packed variant of the cached data set in `unpacked_dir`, cached beside it as `<dir>-packed`;
    with `rows`, of those rows only, in that order (an epoch of a data selection), cached as
    `<dir>-packed-<hash of rows>`.

    Built once, like the unpacked cache; other local ranks wait for it on the file system.
    """
    suffix = "-packed" if rows is None else f"-packed-{_rows_key(rows)}"
    target = unpacked_dir.with_name(unpacked_dir.name + suffix)
    publish_once(target, lambda staging: _build_packed(spec, cfg, unpacked_dir, staging, rows),
                 is_complete=lambda t: (t / REPORT_FILE).is_file(), builder=is_local_main)
    report = PackingReport(**json.loads((target / REPORT_FILE).read_text()))
    log(f"{report.summary()} -> {target}")
    return datasets.load_from_disk(str(target))


def _rows_key(rows: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


def packed_row_count(lengths: np.ndarray, max_seq_len: int) -> int:
    """How many packed rows the samples of these lengths make (the plan alone, nothing materialised)."""
    return len(best_fit_decreasing(lengths, max_seq_len))


def _build_packed(spec, cfg, unpacked_dir: Path, staging: Path, rows: np.ndarray | None = None) -> None:
    scratch = fresh_dir(staging.with_name(staging.name + "-work"))
    try:
        source = datasets.load_from_disk(str(unpacked_dir))
        if rows is not None:
            source = source.select(rows)
        with datasets_progress(True):
            packed, report = pack_dataset(source, cfg.max_seq_len, cfg.num_proc, cache_file=str(scratch / "rows.arrow"))
        with datasets_progress(False):
            save_to_cache(packed, staging)
        (staging / REPORT_FILE).write_text(json.dumps(report.__dict__, indent=1))
    except ValueError as e:  # a sample longer than the row, or columns that cannot be packed
        raise UserError(f"stage '{spec.name}': {e}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
