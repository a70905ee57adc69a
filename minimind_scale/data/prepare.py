"""jsonl → tokenised, memory-mapped Arrow data sets, built once per content and cached (data/cache.py).

Every line is parsed, validated and encoded inside ``datasets.map`` worker processes, a batch of lines
at a time: through the stage's ``encode_batch`` when it has one, else ``encode`` record by record. A bad
record never raises inside a worker: it yields an ``_error`` text, so the main process can report the
first problems with file and line, or skip them when the user asked for that.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from minimind_scale.data.cache import cache_key, cache_root, datasets_progress, save_to_cache
from minimind_scale.data.packing import prepare_packed
from minimind_scale.data.publish import fresh_dir, publish_once
from minimind_scale.data.record_draws import RecordPosition
from minimind_scale.data.rows import IGNORE_INDEX, NO_LOSS
from minimind_scale.errors import RecordError, UserError

MAX_REPORTED_ERRORS = 10
# Written last into a finished cache entry: its presence means the entry is complete.
DATA_REPORT = "data_report.json"
# Beside the rows: each row's (file index, line), numpy int64 [rows, 2].
RECORD_ORIGINS = "record_origins.npy"


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


_SPAN_SCHEMA = pa.schema([(k, pa.int64()) for k in ("line", "offset", "length")])
_ASCII_SPACE = np.zeros(256, dtype=bool)
_ASCII_SPACE[list(b" \t\n\r\x0b\x0c")] = True  # what bytes.strip() removes


def _span_batch(block: bytes, first_line: int, first_offset: int) -> pa.RecordBatch:
    """`_line_spans` of `block`, whole lines only (the last may lack its newline), numbered from
    `first_line` and placed at `first_offset` in the file; found with numpy rather than line by line."""
    buf = np.frombuffer(block, dtype=np.uint8)
    ends = np.flatnonzero(buf == 10) + 1
    if not len(ends) or ends[-1] != len(buf):
        ends = np.append(ends, len(buf))
    starts = np.concatenate(([0], ends[:-1]))
    # Lines are never empty (each holds at least its newline), so reduceat sums exactly each line's bytes.
    kept = np.add.reduceat(~_ASCII_SPACE[buf], starts, dtype=np.int64) > 0
    numbers = np.arange(first_line, first_line + len(ends), dtype=np.int64)
    return pa.record_batch([numbers[kept], starts[kept] + first_offset, (ends - starts)[kept]], schema=_SPAN_SCHEMA)


def _write_line_spans(path: str, out_file: str, block_bytes: int = 1 << 24) -> None:
    """`_line_spans(path)` written as an Arrow stream file, reading `block_bytes` at a time."""
    line, offset, carry = 1, 0, b""
    with open(path, "rb") as f, pa.OSFile(out_file, "wb") as sink, pa.ipc.new_stream(sink, _SPAN_SCHEMA) as writer:
        while True:
            chunk = f.read(block_bytes)
            block = carry + chunk
            if not chunk:  # the end: what is left is the last line, without its newline
                if block:
                    writer.write_batch(_span_batch(block, line, offset))
                break
            cut = block.rfind(b"\n") + 1
            block, carry = block[:cut], block[cut:]
            if block:
                writer.write_batch(_span_batch(block, line, offset))
                line += block.count(b"\n")
                offset += len(block)


def _encode_spans(batch: dict, path: str, encode, tokenizer, cfg, columns: list[str], encode_batch=None,
                  schema: pa.Schema | None = None, file_index: int | None = None) -> dict | pa.Table:
    """`_encode_rows` over the lines of one batch of `_line_spans`, read from `path` in one go; with `schema`,
    as an Arrow table of that schema (handed to the writer as it is, without datasets' per-column checks)."""
    start = min(batch["offset"])
    with open(path, "rb") as f:
        f.seek(start)
        block = f.read(max(o + n for o, n in zip(batch["offset"], batch["length"])) - start)
    raw = [block[o - start:o - start + n] for o, n in zip(batch["offset"], batch["length"])]
    out = _encode_rows({"line": batch["line"], "raw": raw}, encode, tokenizer, cfg, columns, encode_batch, file_index)
    if schema is None:
        return out
    return pa.table([pa.array(out[f.name], type=f.type) for f in schema], schema=schema)


def _parse_line(raw: bytes) -> dict:
    record = json.loads(raw.decode("utf-8").rstrip("\r\n"))
    if not isinstance(record, dict):
        raise RecordError("record", "a line must hold one JSON object")
    return record


def _line_error(e: Exception) -> str:
    """The `_error` text of a line that could not be read or encoded."""
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text (bad byte at offset {e.start})"
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON: {e.msg} (column {e.colno})"
    return f"field '{e.field}': {e.reason}"


_LINE_ERRORS = (UnicodeDecodeError, json.JSONDecodeError, RecordError)


def _encode_one(record: dict, encode, tokenizer, cfg, position: RecordPosition | None = None) -> dict | Exception:
    try:
        if position is None:
            return encode(record, tokenizer, cfg)
        return encode(record, tokenizer, cfg, position=position)
    except _LINE_ERRORS as e:
        return e


def _encode_records(records: list[dict], encode, encode_batch, tokenizer, cfg,
                    positions: list[RecordPosition] | None = None) -> list:
    """Each record's encoding, or the error encoding it gave: through the stage's `encode_batch` when it
    has one (a RecordError raised out of it sends the batch through `encode` instead), else `encode`.
    `positions` (for a stage with record_positions) go to the encoders beside the records."""
    if encode_batch is not None and records:
        try:
            results = list(encode_batch(records, tokenizer, cfg) if positions is None
                           else encode_batch(records, tokenizer, cfg, positions=positions))
        except RecordError:
            results = None
        if results is not None:
            if len(results) != len(records):
                raise ValueError(f"encode_batch returned {len(results)} results for {len(records)} records")
            return results
    return [_encode_one(r, encode, tokenizer, cfg, None if positions is None else p)
            for r, p in zip(records, positions or [None] * len(records))]


def _no_loss(labels) -> bool:
    if isinstance(labels, list):
        return labels.count(IGNORE_INDEX) == len(labels)
    return all(x == IGNORE_INDEX for x in labels)


def _encode_rows(batch: dict, encode, tokenizer, cfg, columns: list[str], encode_batch=None,
                 file_index: int | None = None) -> dict:
    """`file_index` given (a stage with record_positions): the encoders also get each record's position."""
    out: dict[str, list] = {c: [] for c in columns}
    out["_error"], out["_line"] = [], []
    parsed: list = []
    for raw in batch["raw"]:
        try:
            parsed.append(_parse_line(raw))
        except _LINE_ERRORS as e:
            parsed.append(e)
    records = [r for r in parsed if not isinstance(r, Exception)]
    positions = None if file_index is None else [
        RecordPosition(file_index, n) for n, r in zip(batch["line"], parsed) if not isinstance(r, Exception)]
    encoded = iter(_encode_records(records, encode, encode_batch, tokenizer, cfg, positions))
    for number, record in zip(batch["line"], parsed):
        result = record if isinstance(record, Exception) else next(encoded)
        if not isinstance(result, Exception) and "labels" in result and _no_loss(result["labels"]):
            result = RecordError("labels", f"{NO_LOSS} within max_seq_len {cfg.max_seq_len}")
        if isinstance(result, Exception) and not isinstance(result, _LINE_ERRORS):
            raise result  # not a verdict on the record: a bug, as when `encode` raises it
        error = _line_error(result) if isinstance(result, Exception) else ""
        for c in columns:
            out[c].append(result[c] if error == "" else None)  # the row is dropped or the run refused
        out["_error"].append(error)
        out["_line"].append(number)
    return out


def _probe_columns(path: Path, spec, tokenizer, cfg, limit: int = 1000) -> list[str]:
    """Column names of the stage's encoding, from the first record that encodes."""
    for row in _read_lines(str(path)):
        if row["line"] > limit:
            break
        try:
            record = json.loads(row["raw"].decode("utf-8"))
            if spec.record_positions:
                return sorted(spec.encode(record, tokenizer, cfg, position=RecordPosition(0, row["line"])))
            return sorted(spec.encode(record, tokenizer, cfg))
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
    file_records: list[int] = field(default_factory=list)  # records kept from each data file, in order

    def summary(self) -> str:
        text = f"{self.records} records" + (f", {self.tokens:,} tokens" if self.tokens else "")
        if self.too_long:
            text += f", {self.too_long} dropped with no loss-bearing token within max_seq_len"
        if self.skipped:
            text += (f", {self.skipped} malformed skipped ("
                     + ", ".join(f"{k}: {v}" for k, v in self.reasons.items()) + ")")
        return text


def _encode_file(path: Path, spec, cfg, tokenizer, work_dir: Path, columns: list[str],
                 file_index: int = 0) -> datasets.Dataset:
    # Only line numbers and byte spans go to Arrow: a worker reading a memory-mapped copy of the raw
    # text would keep every page it touched resident, about (file size / num_proc) each.
    (work_dir / "raw").mkdir(parents=True, exist_ok=True)
    fd, spans_file = tempfile.mkstemp(prefix="spans-", suffix=".arrow", dir=work_dir / "raw")
    os.close(fd)
    # 1 MiB blocks: 16 MiB ones take several times longer, in page faults on the fresh buffers of each block.
    _write_line_spans(str(path), spans_file, block_bytes=1 << 20)
    raw = datasets.Dataset.from_file(spans_file)
    features = datasets.Features({c: datasets.Value(spec.value_columns[c]) if c in spec.value_columns
                                  else datasets.Sequence(datasets.Value("int32")) for c in columns})
    features["_error"] = datasets.Value("string")
    features["_line"] = datasets.Value("int64")
    # Small files are faster in one process than in a pool that must start up.
    num_proc = max(1, min(cfg.num_proc, math.ceil(len(raw) / 2000)))
    with datasets_progress(True):
        return raw.map(
            _encode_spans, batched=True, batch_size=500, num_proc=num_proc if num_proc > 1 else None,
            remove_columns=raw.column_names, features=features,
            fn_kwargs=dict(path=str(path), encode=spec.encode, tokenizer=tokenizer, cfg=cfg, columns=columns,
                           encode_batch=spec.encode_batch, schema=features.arrow_schema,
                           file_index=file_index if spec.record_positions else None),
            desc=f"tokenising {path.name}",
        )


def _collect_errors(parts: list[tuple[Path, datasets.Dataset]]) -> tuple[list[str], Counter, int, int]:
    """(first problems as file:line texts, count per reason, malformed count, dropped-as-too-long count)."""
    shown, reasons, malformed, no_loss = [], Counter(), 0, 0
    for path, ds in parts:
        # The rows with an error, found by Arrow on the column (a Python call per row costs ~1 s per 300k).
        bad_at = np.flatnonzero(_error_mask(ds)).tolist()
        bad = ds.select_columns(["_error", "_line"]).select(bad_at)
        for row in bad:
            if NO_LOSS in row["_error"]:
                no_loss += 1
                continue
            malformed += 1
            reasons[row["_error"].split(":")[0]] += 1
            if len(shown) < MAX_REPORTED_ERRORS:
                shown.append(f"{path}:{row['_line']}: {row['_error']}")
    return shown, reasons, malformed, no_loss


def _error_mask(ds: datasets.Dataset) -> np.ndarray:
    """Whether each row of `ds` has an `_error` text (is to be reported or dropped)."""
    errors = ds.data.column("_error") if ds._indices is None else pa.array(ds.with_format(None)["_error"])
    return np.asarray(pc.not_equal(errors, "").to_numpy(zero_copy_only=False), dtype=bool)


def build_dataset(spec, cfg, tokenizer, files: list[Path], staging: Path) -> DataReport:
    """Encode every file and save the kept rows into the directory `staging`."""
    scratch = fresh_dir(staging.with_name(staging.name + "-work"))
    try:
        columns = _probe_columns(files[0], spec, tokenizer, cfg)
        parts = [(p, _encode_file(p, spec, cfg, tokenizer, scratch, columns, k)) for k, p in enumerate(files)]
        with datasets_progress(False):
            return _save_kept_rows(parts, cfg, files, staging)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _save_kept_rows(parts: list[tuple[Path, datasets.Dataset]], cfg, files: list[Path], staging: Path) -> DataReport:
    """Report or drop the bad records and save the rest into `staging`, the report last."""
    shown, reasons, n_bad, n_no_loss = _collect_errors(parts)
    n_all = sum(len(ds) for _, ds in parts)
    if n_bad and not cfg.skip_bad_records:
        more = f"\n... and {n_bad - len(shown)} more" if n_bad > len(shown) else ""
        raise UserError(f"{n_bad} of {n_all} records are malformed (set skip_bad_records true to skip them):\n"
                        + "\n".join(shown) + more)
    merged = datasets.concatenate_datasets([ds for _, ds in parts])
    file_index = np.repeat(np.arange(len(parts)), [len(ds) for _, ds in parts])
    if n_bad or n_no_loss:
        kept = np.flatnonzero(~_error_mask(merged))
        merged, file_index = merged.select(kept), file_index[kept]
    if len(merged) == 0:
        raise UserError(f"no usable record in {', '.join(map(str, files))}")
    lines = np.asarray(merged.with_format("numpy", columns=["_line"])["_line"], dtype=np.int64)
    merged = merged.remove_columns(["_error", "_line"])
    save_to_cache(merged, staging)
    # Where each row came from (file index, 1-based line): a record's identity across encodings of the same files.
    np.save(staging / RECORD_ORIGINS, np.stack([file_index.astype(np.int64), lines], axis=1))
    saved = datasets.load_from_disk(str(staging))  # only the kept rows, memory-mapped
    tokens = sum(pc.sum(pc.list_value_length(saved.data.column(c))).as_py() or 0
                 for c in saved.column_names if c.endswith("input_ids"))
    report = DataReport(records=len(merged), skipped=n_bad, reasons=dict(reasons), too_long=n_no_loss,
                        tokens=int(tokens), file_records=np.bincount(file_index, minlength=len(parts)).tolist())
    (staging / DATA_REPORT).write_text(json.dumps(report.__dict__, indent=1))
    return report


def is_built(target: Path) -> bool:
    return (target / DATA_REPORT).is_file()


def prepare_dataset(spec, cfg, tokenizer, is_local_main: bool = True,
                    log=print) -> tuple[datasets.Dataset, Path, DataReport]:
    """The cached tokenised data set for this stage and config, building it if needed; packed when
    `cfg.packing` is set. The returned path is always the unpacked data set's directory. Only the local
    main process builds; the others wait for it on the file system."""
    spec.check_options(cfg)
    files = check_data_files(cfg.data_path)
    target = cache_root(cfg) / f"{spec.name}-{cache_key(spec, cfg, tokenizer, files)}"
    if is_built(target):
        log(f"using cached tokenised data {target}")
    else:
        built = publish_once(target, lambda staging: build_dataset(spec, cfg, tokenizer, files, staging),
                             is_complete=is_built, builder=is_local_main)
        if built is not None:
            log(f"tokenised {built.summary()} -> {target}")
    report = DataReport(**json.loads((target / DATA_REPORT).read_text()))
    if cfg.packing:
        return prepare_packed(spec, cfg, target, is_local_main, log), target, report
    return datasets.load_from_disk(str(target)), target, report
