"""Validation during training, end to end on tiny fp32 models on CPU.

- Exactness: the loss and perplexity logged for a held-out set at step N are what `eval` prints for the
  step-N checkpoint, exported, on the same records (`val.jsonl`, or an --eval_data_path file), to 1e-5, on
  1 process, on 2 DDP processes and under ZeRO-3. The SFT augmentations stay on in training, so this also
  proves the held-out records are measured as given, unpacked, as `eval` measures them.
- Usefulness: a run that overfits has an eval loss that falls then rises; best/ holds the minimum's step
  and weights; early stopping ends the run two evaluations after the minimum with final/ and best/ written.
- Isolation: no held-out record is ever in a training batch (tests/plugins/record_batches.py writes every
  training row), packed or not, and every other record is trained on exactly once per epoch.
"""
from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path

import pytest
from validation_helpers import (
    checkpoint_steps,
    evaluate_model,
    export_checkpoint,
    logged_evaluations,
    read_jsonl,
    recorded_samples,
)

from conftest import REPO, SHARED, needs_shared, run_cli

pytestmark = [needs_shared, pytest.mark.usefixtures("one_thread")]

TOKENIZER = SHARED / "tokenizers" / "minimind"
DATA = SHARED / "data"
RECORD_PLUGIN = REPO / "tests" / "plugins" / "record_batches.py"
SEQ = 128
# Long enough in the isolation test for packing to put several conversations in most rows.
RECORDED_SEQ = 512
TINY = ["--model", "minimind2-small", "--hidden_size", "32", "--num_hidden_layers", "1", "--tokenizer",
        str(TOKENIZER), "--dtype", "fp32", "--num_proc", "1", "--warmup_steps", "0", "--log_interval", "1"]
TOL = 1e-5


@functools.cache
def tokenizer():
    """The runs' tokenizer, loaded as the runs load it."""
    from minimind_scale.models.build import load_tokenizer

    return load_tokenizer(str(TOKENIZER))


def head(source: Path, lines: int, target: Path) -> Path:
    target.write_text("".join(source.read_text().splitlines(keepends=True)[:lines]))
    return target


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """48 alpaca conversations, 16 of them for overfitting, and 23 web texts (odd sizes, so two processes
    get shards of different lengths)."""
    root = tmp_path_factory.mktemp("validation_data")
    return {"sft": head(DATA / "sft_en_alpaca_demo.jsonl", 48, root / "sft.jsonl"),
            "sft16": head(DATA / "sft_en_alpaca_demo.jsonl", 16, root / "sft16.jsonl"),
            "web": head(DATA / "pretrain_en_c4wiki.jsonl", 23, root / "web.jsonl")}


# --- exactness ------------------------------------------------------------------------------------------------

EXACT_STEPS, EXACT_EVERY = 8, 4


def exact_run_args(data: dict[str, Path], out: Path, batch_size: int) -> list[str]:
    """SFT with the default packing and augmentations, 7 records held out, a web set, a checkpoint at every
    evaluation, and an eval batch size (3) that divides neither set."""
    return ["full_sft", *TINY, "--max_seq_len", str(SEQ), "--data_path", str(data["sft"]), "--out_dir", str(out),
            "--batch_size", str(batch_size), "--max_steps", str(EXACT_STEPS), "--learning_rate", "1e-2",
            "--seed", "5", "--val_size", "7", "--eval_data_path", f"web={data['web']}", "--eval_batch_size", "3",
            "--eval_interval", str(EXACT_EVERY), "--save_interval", str(EXACT_EVERY), "--save_total_limit", "100"]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory, data, data_cache) -> Path:
    out = tmp_path_factory.mktemp("exact") / "run"
    run_cli(exact_run_args(data, out, batch_size=4), data_cache)
    return out


def assert_logged_equals_eval(out: Path, data: dict[str, Path], cache: Path) -> None:
    """For every evaluated step: export its checkpoint and compare `eval` of val.jsonl (full_sft) and of the
    web file (pretrain) with the logged values."""
    logged = logged_evaluations(out)
    assert sorted(logged) == list(range(EXACT_EVERY, EXACT_STEPS + 1, EXACT_EVERY))
    assert checkpoint_steps(out) == sorted(logged)
    val_losses_measured = []
    for step, row in sorted(logged.items()):
        model = export_checkpoint(out / "checkpoints" / f"step_{step}", out.parent / f"export_{step}")
        val = evaluate_model(model, out / "val.jsonl", "full_sft", SEQ, cache)
        web = evaluate_model(model, data["web"], "pretrain", SEQ, cache)
        assert (val["records"], web["records"]) == (7, 23)
        for name, result in (("val", val), ("web", web)):
            assert abs(row[f"eval/{name}/loss"] - result["loss"]) <= TOL, (step, name, row, result)
            assert row[f"eval/{name}/ppl"] == pytest.approx(result["ppl"], rel=TOL), (step, name, row, result)
        val_losses_measured.append(val["loss"])
    # The two evaluations differ, so a test reading the wrong checkpoint would fail.
    first, last = val_losses_measured
    assert abs(first - last) > 1e-2


def test_logged_eval_equals_eval_of_exported_checkpoint(single_process_run, data, data_cache):
    """One process, packed training rows and augmented conversations; held-out sets measured as given."""
    assert_some_val_record_is_augmented_in_training(single_process_run, data["sft"])
    assert_logged_equals_eval(single_process_run, data, data_cache)


def assert_some_val_record_is_augmented_in_training(out: Path, data_file: Path) -> None:
    """Training encodes at least one held-out record differently from how it is written (the SFT augmentations
    at their default ratios), so measuring it as trained would not give eval's number."""
    from minimind_scale.data.record_draws import RecordPosition
    from minimind_scale.stages.full_sft import SPEC

    cfg = SPEC.config(max_seq_len=SEQ, seed=5)
    line_of = {line: n for n, line in enumerate(data_file.read_text().splitlines(), start=1)}
    held_out = [line for line in (out / "val.jsonl").read_text().splitlines() if line.strip()]
    augmented = [line for line in held_out
                 if SPEC.encode(json.loads(line), tokenizer(), cfg, RecordPosition(0, line_of[line]))["input_ids"]
                 != SPEC.encode(json.loads(line), tokenizer(), cfg, None)["input_ids"]]
    assert augmented, "no held-out record is augmented in training: the test would not tell the encodings apart"


@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_two_processes_log_what_one_process_eval_measures(backend, tmp_path, data, data_cache, single_process_run):
    """Each process measures a shard of different length (4 and 3 val records, 12 and 11 web texts); the sums
    over both are the one-process value of the same weights."""
    out = tmp_path / "run"
    extra = ["--deepspeed", str(REPO / "ds_configs" / "zero3.json")] if backend == "zero3" else []
    run_cli([*exact_run_args(data, out, batch_size=2), *extra], data_cache, nproc=2)
    assert (out / "val.jsonl").read_text() == (single_process_run / "val.jsonl").read_text()
    assert_logged_equals_eval(out, data, data_cache)


# --- overfitting: best/ and early stopping --------------------------------------------------------------------

OVERFIT_STEPS, OVERFIT_EVERY, PATIENCE = 30, 2, 2


def overfit_args(data: dict[str, Path], out: Path) -> list[str]:
    """12 conversations trained on, 4 held out, lr 1e-2: the val loss bottoms out near step 12 (7.40, from 8.60
    at step 2) and ends near 9.4, margins far above any numerical noise."""
    return ["full_sft", *TINY, "--max_seq_len", str(SEQ), "--data_path", str(data["sft16"]), "--out_dir", str(out),
            "--batch_size", "4", "--max_steps", str(OVERFIT_STEPS), "--learning_rate", "1e-2", "--seed", "0",
            "--save_interval", "0", "--val_size", "4", "--eval_interval", str(OVERFIT_EVERY),
            "--save_best_metric", "eval/val/loss"]


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory, data, data_cache) -> Path:
    out = tmp_path_factory.mktemp("overfit") / "run"
    run_cli(overfit_args(data, out), data_cache)
    return out


@pytest.fixture(scope="module")
def early_stopped_run(tmp_path_factory, data, data_cache) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("early_stopped") / "run"
    proc = run_cli([*overfit_args(data, out), "--early_stopping_patience", str(PATIENCE)], data_cache)
    return out, proc.stdout + proc.stderr


def val_losses(out: Path) -> list[tuple[int, float]]:
    return [(step, row["eval/val/loss"]) for step, row in sorted(logged_evaluations(out).items())]


def test_overfitting_run_keeps_the_best_evaluation(overfit_run, data_cache):
    series = val_losses(overfit_run)
    assert [s for s, _ in series] == list(range(OVERFIT_EVERY, OVERFIT_STEPS + 1, OVERFIT_EVERY))
    losses = [v for _, v in series]
    lowest = min(range(len(losses)), key=losses.__getitem__)
    best_step, best_value = series[lowest]
    assert 0 < lowest < len(losses) - 1, series
    assert losses[0] > best_value + 0.5 and losses[-1] > best_value + 0.5, series
    record = json.loads((overfit_run / "best" / "best_metric.json").read_text())
    assert (record["metric"], record["mode"], record["step"]) == ("eval/val/loss", "min", best_step)
    assert record["value"] == pytest.approx(best_value, abs=1e-12)
    remeasured = evaluate_model(overfit_run / "best", overfit_run / "val.jsonl", "full_sft", SEQ, data_cache)
    assert remeasured["records"] == 4
    assert abs(remeasured["loss"] - best_value) <= TOL, (remeasured, best_value)


def test_early_stopping_ends_the_run_after_patience_evaluations(overfit_run, early_stopped_run, data_cache):
    out, output = early_stopped_run
    full = val_losses(overfit_run)
    best_step, best_value = min(full, key=lambda item: item[1])
    stop_step = best_step + PATIENCE * OVERFIT_EVERY
    assert stop_step < OVERFIT_STEPS
    # Evaluation never moves the training RNG: the stopped run is the full run's prefix, to the last bit.
    assert val_losses(out) == [(s, v) for s, v in full if s <= stop_step]
    assert f"early stopping after step {stop_step}:" in output, output[-2000:]
    assert checkpoint_steps(out)[-1] == stop_step
    assert max(r["step"] for r in read_jsonl(out / "metrics.jsonl")) == stop_step
    assert json.loads((out / "best" / "best_metric.json").read_text())["step"] == best_step
    best = evaluate_model(out / "best", out / "val.jsonl", "full_sft", SEQ, data_cache)
    assert abs(best["loss"] - best_value) <= TOL, (best, best_value)
    final = evaluate_model(out / "final", out / "val.jsonl", "full_sft", SEQ, data_cache)
    assert abs(final["loss"] - val_losses(out)[-1][1]) <= TOL, (final, val_losses(out)[-1])


# --- isolation: held-out records are never trained on ---------------------------------------------------------

def encoded_as_given(records: list[dict], max_seq_len: int) -> list[tuple[int, ...]]:
    """Each record's input ids through full_sft's encoder, as written (the run keeps every record as given:
    --add_system_ratio 0 --empty_think_ratio 1)."""
    from minimind_scale.stages.full_sft import SPEC

    cfg = SPEC.config(max_seq_len=max_seq_len, add_system_ratio=0.0, empty_think_ratio=1.0)
    return [tuple(SPEC.encode(record, tokenizer(), cfg, None)["input_ids"]) for record in records]


@pytest.mark.parametrize("packing", ["false", "true"])
def test_held_out_records_are_never_trained_on(packing, tmp_path, data, data_cache):
    """One epoch, with evaluations among its steps; packed, each row's samples are cut apart again."""
    out, batches = tmp_path / "run", tmp_path / "batches.jsonl"
    run_cli(["--plugin", str(RECORD_PLUGIN), "recorded_sft", *TINY, "--max_seq_len", str(RECORDED_SEQ),
             "--data_path", str(data["sft"]), "--out_dir", str(out), "--batch_size", "4", "--epochs", "1",
             "--learning_rate", "1e-3", "--seed", "7", "--save_interval", "0", "--packing", packing,
             "--add_system_ratio", "0", "--empty_think_ratio", "1", "--val_size", "8", "--eval_interval", "3"],
            data_cache, RECORD_BATCHES_FILE=str(batches))
    records = read_jsonl(data["sft"])
    held_out = read_jsonl(out / "val.jsonl")
    assert len(held_out) == 8 and all(r in records for r in held_out)
    encoded = encoded_as_given(records, RECORDED_SEQ)
    assert len(set(encoded)) == len(records), "two records encode alike: identity by ids would be ambiguous"
    val_ids = set(encoded_as_given(held_out, RECORDED_SEQ))
    train_ids = [ids for ids in encoded if ids not in val_ids]
    trained = recorded_samples(batches, tokenizer().pad_token_id)
    leaked = val_ids & set(trained)
    assert not leaked, f"{len(leaked)} held-out record(s) in a training batch"
    # One epoch trains on every other record exactly once.
    missing, unexpected = Counter(train_ids) - Counter(trained), Counter(trained) - Counter(train_ids)
    assert not missing and not unexpected, (f"{missing.total()} training record(s) not trained on; "
                                            f"{unexpected.total()} trained sample(s) not a training record or repeated")
    rows = read_jsonl(batches)
    if packing == "true":
        assert all("position_ids" in r for r in rows) and len(rows) <= 3 * len(train_ids) // 4, "too little packed"
    else:
        assert all("attention_mask" in r for r in rows) and len(rows) == len(train_ids)
