"""Fingerprints of the cached rows of every shared data set, to prove a change to the encoding leaves them
byte-identical.

    python benchmarks/cache_identity.py --out FILE.json               # record the fingerprints
    python benchmarks/cache_identity.py --compare FILE.json           # exit 1 on any difference
    python benchmarks/cache_identity.py --compare benchmarks/results/cache_identity.json

benchmarks/results/cache_identity.json holds the fingerprints of the rows cached before encoding was
batched (per-record `encode`, jinja-rendered chat templates): the current code must reproduce them.

Each file in ../shared/data is prepared (cold, in a fresh scratch cache) with every stage that accepts its
format: pretrain for pretrain_*, full_sft / lora / distill for sft_*, dpo and reward for dpo_*; at the
stage's default max_seq_len and at 128 (which truncates and drops rows), the SFT augmentations of full_sft,
lora and distill off (add_system_ratio 0, empty_think_ratio 1: the rows they give are the rows from before
the augmentations existed); with the shared MiniMind tokenizer,
and the sft_* / dpo_* ones also with the packaged default tokenizer (a different chat template). The
fingerprint is a sha256 over the Arrow rows of the unpacked entry (column names and types, then every
column: list lengths and values as little-endian bytes, or the values' JSON), and the same over the packed
entry where the stage packs, plus data_report.json. To fingerprint older code, run this file with
PYTHONPATH pointing at a copy of it (the package is imported from there).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STAGES_FOR = {"pretrain_": ("pretrain",), "sft_": ("full_sft", "lora", "distill"), "dpo_": ("dpo", "reward")}


def table_digest(path: Path) -> tuple[int, str]:
    """(rows, sha256) of the Arrow data set saved in `path`."""
    import datasets
    import numpy as np
    import pyarrow as pa

    ds = datasets.load_from_disk(str(path))
    table = ds.data.table
    h = hashlib.sha256()
    h.update(json.dumps([(f.name, str(f.type)) for f in table.schema]).encode())
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        h.update(name.encode())
        if pa.types.is_list(col.type) and pa.types.is_integer(col.type.value_type):
            lengths = np.asarray(col.value_lengths().to_numpy(zero_copy_only=False), dtype="<i8")
            h.update(lengths.tobytes())
            h.update(np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype="<i8").tobytes())
        else:
            h.update(json.dumps(col.to_pylist(), ensure_ascii=False).encode())
    return len(ds), h.hexdigest()


def cases(tokenizers: dict[str, str]) -> list[tuple[str, str, str, int | None]]:
    """(data file, stage, tokenizer name, max_seq_len or None for the stage's default)."""
    out = []
    for path in sorted((SHARED / "data").glob("*.jsonl")):
        for prefix, stages in STAGES_FOR.items():
            if not path.name.startswith(prefix):
                continue
            for stage in stages:
                for tok_name in tokenizers:
                    if tok_name != "minimind" and prefix == "pretrain_":
                        continue
                    for length in (None, 128):
                        out.append((str(path), stage, tok_name, length))
    return out


def fingerprint_all(work: Path, num_proc: int, log=print) -> dict:
    from minimind_scale.data.prepare import prepare_dataset
    from minimind_scale.models.build import load_tokenizer
    from minimind_scale.training.registry import discover, get_stage

    discover()
    tok_dirs = {"minimind": str(SHARED / "tokenizers" / "minimind"), "packaged": None}
    tokenizers = {name: load_tokenizer(d) for name, d in tok_dirs.items()}
    fake_teacher = work / "teacher"  # distill's config wants a model directory; preparing data never loads it
    fake_teacher.mkdir(parents=True, exist_ok=True)
    (fake_teacher / "config.json").write_text("{}")
    results = {}
    for path, stage, tok_name, length in cases(tokenizers):
        spec = get_stage(stage)
        fields = {"data_path": [path], "num_proc": num_proc, "cache_dir": str(work / "cache"),
                  "tokenizer": tok_dirs[tok_name], "skip_bad_records": True}
        if stage == "lora":
            fields["model"] = str(fake_teacher)
        if stage == "distill":
            fields.update(teacher=str(fake_teacher), model="minimind2-small")
        if length is not None:
            fields["max_seq_len"] = length
        # The SFT augmentations at the settings that leave records as they are (their rows are today's).
        fields.update(spec.eval_overrides)
        cfg = spec.config.model_validate(fields)
        t = time.perf_counter()
        _, unpacked, report = prepare_dataset(spec, cfg, tokenizers[tok_name], log=lambda *_: None)
        rows, digest = table_digest(unpacked)
        entry = {"rows": rows, "sha256": digest, "report": report.__dict__}
        packed = unpacked.with_name(unpacked.name + "-packed")
        if packed.is_dir():
            entry["packed_rows"], entry["packed_sha256"] = table_digest(packed)
        key = f"{Path(path).name} {stage} {tok_name} max_seq_len={cfg.max_seq_len}"
        results[key] = entry
        log(f"{key}: {rows} rows {digest[:16]} ({time.perf_counter() - t:.1f} s)")
        shutil.rmtree(work / "cache", ignore_errors=True)  # every case cold
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the fingerprints here")
    ap.add_argument("--compare", help="compare with the fingerprints in this file; exit 1 on any difference")
    ap.add_argument("--num_proc", type=int, default=2)
    args = ap.parse_args()
    if not (SHARED / "data").is_dir():
        raise SystemExit(f"{SHARED / 'data'} is absent")
    import minimind_scale

    print(f"minimind_scale from {Path(minimind_scale.__file__).parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="cache_identity-") as tmp:
        results = fingerprint_all(Path(tmp), args.num_proc, log=lambda m: print(m, file=sys.stderr))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if args.compare:
        expected = json.loads(Path(args.compare).read_text())
        bad = [k for k in sorted(set(expected) | set(results)) if expected.get(k) != results.get(k)]
        for k in sorted(results):
            print(f"{'DIFFERS' if k in bad else 'identical'}  {k}")
        for k in bad:
            print(f"DIFFERS {k}:\n  before {expected.get(k)}\n  now    {results.get(k)}")
        print(f"{len(results) - len(bad)} of {len(set(expected) | set(results))} cases byte-identical")
        raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
