"""jsonl → tokenised, memory-mapped Arrow data sets, built once per content and cached (datacache.py).

Every line is parsed, validated and encoded inside ``datasets.map`` worker processes. A bad record
never raises inside a worker: it yields an ``_error`` text, so the main process can report the
first problems with file and line, or skip them when the user asked for that.
"""
from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow.compute as pc

from .datacache import cache_key, cache_root, datasets_progress, save_to_cache
from .errors import RecordError, UserError
from .packing import prepare_packed
from .publish import fresh_dir, publish_once
from .rows import IGNORE_INDEX, NO_LOSS

MAX_REPORTED_ERRORS = 10
# Written last into a finished cache entry: its presence means the entry is complete.
DATA_REPORT = "data_report.json"


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
            out[c].append(encoded[c] if error == "" else None)  # the row is dropped or the run refused
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
            text += (f", {self.skipped} malformed skipped ("
                     + ", ".join(f"{k}: {v}" for k, v in self.reasons.items()) + ")")
        return text


def _encode_file(path: Path, spec, cfg, tokenizer, work_dir: Path, columns: list[str]) -> datasets.Dataset:
    # Only line numbers and byte spans go to Arrow: a worker reading a memory-mapped copy of the raw
    # text would keep every page it touched resident, about (file size / num_proc) each.
    with datasets_progress(False):
        raw = datasets.Dataset.from_generator(
            _line_spans, gen_kwargs={"path": str(path)}, cache_dir=str(work_dir / "raw"),
            features=datasets.Features({k: datasets.Value("int64") for k in ("line", "offset", "length")}),
        )
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


def build_dataset(spec, cfg, tokenizer, files: list[Path], staging: Path) -> DataReport:
    """Encode every file and save the kept rows into the directory `staging`."""
    scratch = fresh_dir(staging.with_name(staging.name + "-work"))
    try:
        columns = _probe_columns(files[0], spec.encode, tokenizer, cfg)
        parts = [(p, _encode_file(p, spec, cfg, tokenizer, scratch, columns)) for p in files]
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
    if n_bad or n_no_loss:
        merged = merged.filter(lambda e: e == "", input_columns="_error")
    if len(merged) == 0:
        raise UserError(f"no usable record in {', '.join(map(str, files))}")
    merged = merged.remove_columns(["_error", "_line"])
    save_to_cache(merged, staging)
    saved = datasets.load_from_disk(str(staging))  # only the kept rows, memory-mapped
    tokens = sum(pc.sum(pc.list_value_length(saved.data.column(c))).as_py() or 0
                 for c in saved.column_names if c.endswith("input_ids"))
    report = DataReport(records=len(merged), skipped=n_bad, reasons=dict(reasons), too_long=n_no_loss,
                        tokens=int(tokens))
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
