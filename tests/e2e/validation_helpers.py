"""Helpers of tests/e2e/test_validation.py: tool commands in this process, logged evaluations, and the
samples a recorded training batch holds."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path


def cli_json(args: list[str]) -> dict:
    """The JSON last line a tool command (`eval`) prints, run through the real entry point in this process
    (a subprocess would spend seconds importing torch for a sub-second command)."""
    stdout = cli_stdout(args)
    return json.loads(stdout.strip().splitlines()[-1])


def cli_stdout(args: list[str]) -> str:
    """What a tool command prints on stdout; a non-zero exit fails the test."""
    from minimind_scale.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(args)
        except SystemExit as e:
            if e.code:
                raise AssertionError(f"{' '.join(args)} exited {e.code}\n{out.getvalue()[-3000:]}") from None
    return out.getvalue()


def export_checkpoint(checkpoint: Path, target: Path) -> Path:
    """`export` of one checkpoint (plain or ZeRO) to a model directory."""
    if not target.exists():
        cli_stdout(["export", "--checkpoint", str(checkpoint), "--out_dir", str(target)])
    return target


def evaluate_model(model: Path, data: Path, stage: str, max_seq_len: int, cache: Path) -> dict:
    """`eval` of a model directory on a file, in fp32 on one process."""
    return cli_json(["eval", "--model", str(model), "--data_path", str(data), "--stage", stage,
                     "--max_seq_len", str(max_seq_len), "--dtype", "fp32", "--cache_dir", str(cache)])


def logged_evaluations(out_dir: Path) -> dict[int, dict]:
    """{step: its metrics.jsonl evaluation row}."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if any(k.startswith("eval/") for k in r)}


def checkpoint_steps(out_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step_")) for p in (out_dir / "checkpoints").glob("step_*"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def recorded_samples(path: Path, pad_id: int) -> list[tuple[int, ...]]:
    """The token ids of every sample in the rows tests/plugins/record_batches.py wrote: an unpacked row's
    tokens under its attention mask; a packed row cut where its position ids restart at 0, less padding
    (a lone pad token, which packing gives position 0)."""
    samples = []
    for row in read_jsonl(path):
        if "attention_mask" in row:
            samples.append(tuple(row["input_ids"][:sum(row["attention_mask"])]))
        else:
            samples.extend(s for s in packed_samples(row["input_ids"], row["position_ids"]) if s != (pad_id,))
    return samples


def packed_samples(input_ids: list[int], position_ids: list[int]) -> list[tuple[int, ...]]:
    """A packed row's samples: its ids cut before every position 0."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(input_ids)]
    return [tuple(input_ids[a:b]) for a, b in zip(starts, starts[1:])]
