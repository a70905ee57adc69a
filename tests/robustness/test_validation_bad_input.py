"""Bad input for the data-selection and evaluation flags (--data_weights, --max_samples, --val_size,
--eval_data_path, --save_best_metric, --early_stopping_patience, resuming on other data) ends with exit
code 2 and one readable `error: ...` message, never a traceback, and writes nothing into out_dir.

A check that needs no data must also fail fast: before any file is tokenised (the run's private cache
gets no data set entry). Checks whose answer depends on the records (how many there are, whether an
evaluation file has the stage's format) may tokenise, but still write nothing.

Every run but one goes through the real entry point in this process (`cli_in_process`): they all stop
before a model or an Accelerator exists, and a subprocess each would mostly import torch. Resuming needs
a checkpoint and gets that far, so it runs as two subprocesses.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import cli_in_process, run_cli

COMMON = ["--model", "tiny", "--max_steps", "1", "--batch_size", "2", "--max_seq_len", "64", "--dtype", "fp32",
          "--num_proc", "1"]
N_RECORDS = 8  # in each of text.jsonl, text2.jsonl and chat.jsonl


def _lines(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """One tiny file per record format: pretraining texts, conversations, preference pairs."""
    root = tmp_path_factory.mktemp("validation_data")
    texts = [{"text": f"Sample {i} says hello to the small model."} for i in range(N_RECORDS)]
    _lines(root / "text.jsonl", texts)
    _lines(root / "text2.jsonl", texts)
    _lines(root / "one.jsonl", texts[:1])
    chats = [{"conversations": _chat(f"What is {i} + 1?", f"{i + 1}.")} for i in range(N_RECORDS)]
    _lines(root / "chat.jsonl", chats)
    _lines(root / "sub" / "chat.jsonl", chats)
    pairs = [{"chosen": _chat("Hi", "Hello, how can I help?"), "rejected": _chat("Hi", "Go away.")}] * 4
    _lines(root / "pairs.jsonl", pairs)
    return root


# --------------------------------------------------------------------------- the checks


@dataclass
class Case:
    stage: str
    files: tuple[str, ...]                    # --data_path, names under the data folder
    flags: tuple[str, ...]                    # "{data}" stands for the data folder
    lines: tuple[tuple[str, ...], ...]        # each group: substrings that must sit on one line of stderr
    fast: bool                                # must fail before tokenising anything
    xfail: str | None = None


TEXT, TEXT2, CHAT, PAIRS = "text.jsonl", "text2.jsonl", "chat.jsonl", "pairs.jsonl"
ALL_TEXT = (TEXT, TEXT2)

CASES: dict[str, Case] = {
    # caps and weights: one value per file, and sensible ones; all known from the command line
    "data_weights_count_differs_from_files": Case(
        "pretrain", ALL_TEXT, ("--data_weights", "1"), (("data_weights", "1 value", "2 data file"),), fast=True),
    "max_samples_count_neither_one_nor_per_file": Case(
        "pretrain", (TEXT, TEXT2, "one.jsonl"), ("--max_samples", "2", "3"),
        (("max_samples", "2 values", "3 data file"),), fast=True),
    "negative_data_weight": Case(
        "pretrain", ALL_TEXT, ("--data_weights", "1", "-1"), (("data_weights", ">= 0", "-1"),), fast=True),
    "all_data_weights_zero": Case(
        "pretrain", ALL_TEXT, ("--data_weights", "0", "0"), (("data_weights", "> 0"),), fast=True),
    "max_samples_zero": Case(
        "pretrain", (TEXT,), ("--max_samples", "0"), (("max_samples", ">= 1", "0"),), fast=True),
    "data_weight_not_a_number": Case(
        "pretrain", ALL_TEXT, ("--data_weights", "1", "nan"), (("data_weights", "nan"),), fast=True),
    "data_weight_infinite": Case(
        "pretrain", ALL_TEXT, ("--data_weights", "1", "inf"), (("data_weights", "inf"),), fast=True),
    # the val split: only the record count says whether it leaves something on both sides
    "val_size_count_takes_every_record": Case(
        "pretrain", (TEXT,), ("--val_size", str(N_RECORDS)),
        (("val_size", f"{N_RECORDS} of the {N_RECORDS} records", "nothing to train"),), fast=False),
    "val_size_share_takes_every_record": Case(
        "pretrain", (TEXT,), ("--val_size", "0.9999"), (("val_size 0.9999", "nothing to train"),), fast=False),
    "val_size_holds_out_no_record": Case(
        "pretrain", (TEXT,), ("--val_size", "0.01"), (("val_size 0.01", f"{N_RECORDS} records", "no record"),),
        fast=False),
    "val_size_count_not_whole": Case(
        "pretrain", (TEXT,), ("--val_size", "2.5"), (("val_size 2.5", "whole number"),), fast=True),
    "val_size_zero": Case(
        "pretrain", (TEXT,), ("--val_size", "0"), (("val_size", "greater than 0"),), fast=True),
    "val_size_infinite": Case(
        "pretrain", (TEXT,), ("--val_size", "inf"), (("val_size", "inf"),), fast=True),
    "val_takes_the_only_record_of_a_weighted_file": Case(
        "pretrain", (TEXT, "one.jsonl"), ("--val_size", "0.9", "--data_weights", "1", "1"),
        (("one.jsonl", "weight", "no record", "train"),), fast=False),
    # evaluation files: their format is the stage's, checked record by record
    "sft_eval_file_of_preference_pairs": Case(
        "sft", (CHAT,), ("--eval_data_path", "{data}/pairs.jsonl"),
        (("evaluation set 'pairs'",), ("{data}/pairs.jsonl:1:", "field", "conversations")), fast=False),
    "dpo_eval_file_of_conversations": Case(
        "dpo", (PAIRS,), ("--eval_data_path", "dev={data}/chat.jsonl"),
        (("evaluation set 'dev'",), ("{data}/chat.jsonl:1:", "field 'chosen'")), fast=False),
    "pretrain_eval_file_of_conversations": Case(
        "pretrain", (TEXT,), ("--eval_data_path", "{data}/chat.jsonl"),
        (("evaluation set 'chat'",), ("{data}/chat.jsonl:1:", "field 'text'")), fast=False),
    "eval_file_missing": Case(
        "sft", (CHAT,), ("--eval_data_path", "dev={data}/nope.jsonl"), (("{data}/nope.jsonl", "not found"),),
        fast=True),
    "eval_set_without_a_file": Case(
        "sft", (CHAT,), ("--eval_data_path", "dev="), (("eval_data_path", "dev="),), fast=True),
    # evaluation set names
    "eval_set_name_with_slash": Case(
        "sft", (CHAT,), ("--eval_data_path", "a/b={data}/chat.jsonl"), (("'a/b=", "set name", "letters"),),
        fast=True),
    "two_eval_sets_one_name": Case(
        "sft", (CHAT,), ("--eval_data_path", "dev={data}/chat.jsonl", "dev={data}/sub/chat.jsonl"),
        (("more than one evaluation set", "dev", "NAME=FILE"),), fast=True),
    "two_eval_files_one_stem": Case(
        "sft", (CHAT,), ("--eval_data_path", "{data}/chat.jsonl", "{data}/sub/chat.jsonl"),
        (("more than one evaluation set", "chat", "NAME=FILE"),), fast=True),
    "eval_set_named_val_beside_val_size": Case(
        "sft", (CHAT,), ("--eval_data_path", "val={data}/chat.jsonl", "--val_size", "2"),
        (("more than one evaluation set", "val", "--val_size"),), fast=True),
    # what best/ and early stopping follow
    "save_best_metric_never_logged": Case(
        "sft", (CHAT,), ("--val_size", "2", "--save_best_metric", "eval/val/accuracy"),
        (("eval/val/accuracy", "never logged", "eval/val/loss", "eval/val/ppl"),), fast=True),
    "save_best_metric_of_a_set_not_given": Case(
        "dpo", (PAIRS,), ("--eval_data_path", "dev={data}/pairs.jsonl", "--save_best_metric", "eval/val/loss"),
        (("eval/val/loss", "never logged", "eval/dev/loss", "eval/dev/reward_accuracy", "eval/dev/reward_margin"),),
        fast=True),
    "early_stopping_without_evaluation_set": Case(
        "sft", (CHAT,), ("--early_stopping_patience", "2"),
        (("early_stopping_patience", "evaluation set", "--val_size", "--eval_data_path"),), fast=True),
    "save_best_metric_without_evaluation_set": Case(
        "sft", (CHAT,), ("--save_best_metric", "eval/val/loss"),
        (("save_best_metric", "evaluation set", "--val_size", "--eval_data_path"),), fast=True),
}


def _params():
    for name, case in CASES.items():
        marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=case.xfail)] if case.xfail else []
        yield pytest.param(name, marks=marks, id=name)


def _run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of the real entry point; an exception it lets through is a failure: run as a
    command it would print a traceback and exit 1."""
    try:
        return cli_in_process(argv, capsys)
    except Exception as e:
        raise AssertionError(f"uncaught {type(e).__name__} (a traceback and exit 1 on the command line): {e}") from e


def assert_one_readable_error(code: int, err: str, shown: str) -> None:
    assert "Traceback" not in err, shown
    assert code == 2, shown
    assert len(re.findall(r"^error: \S", err, re.M)) == 1, f"not exactly one 'error: ...' message\n{shown}"


def assert_on_one_line(err: str, groups: tuple[tuple[str, ...], ...], shown: str) -> None:
    for group in groups:
        assert any(all(s in line for s in group) for line in err.splitlines()), \
            f"expected one line with all of {list(group)}\n{shown}"


def _tokenised_anything(cache: Path) -> bool:
    datasets_dir = cache / "datasets"
    return datasets_dir.exists() and any(datasets_dir.iterdir())


@pytest.mark.parametrize("name", list(_params()))
def test_bad_validation_input(name, data, tmp_path, capsys):
    case = CASES[name]
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = [case.stage, "--data_path", *(str(data / f) for f in case.files), "--out_dir", str(out),
            "--cache_dir", str(cache), *COMMON, *(flag.format(data=data) for flag in case.flags)]
    code, err = _run_in_process(argv, capsys)
    shown = f"argv: {' '.join(argv)}\nexit {code}\n--- stderr (tail)\n{err[-4000:]}"
    assert_one_readable_error(code, err, shown)
    assert_on_one_line(err, tuple(tuple(s.format(data=data) for s in g) for g in case.lines), shown)
    assert not out.exists(), f"the failed run wrote into out_dir: {sorted(p.name for p in out.iterdir())}\n{shown}"
    if case.fast:
        assert not _tokenised_anything(cache), f"tokenised before failing on a check that needs no data\n{shown}"


# --------------------------------------------------------------------------- resuming on other data


def _snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`, plus its folders (as empty hashes)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            for p in sorted(folder.rglob("*"))}


def test_resume_with_other_data_weights_is_refused(data, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    base = ["pretrain", "--data_path", str(data / TEXT), str(data / TEXT2), "--out_dir", str(out), *COMMON,
            "--save_interval", "1"]
    run_cli([*base, "--data_weights", "1", "1"], cache)
    assert (out / "checkpoints" / "step_1" / "trainer_state.json").is_file(), sorted(out.rglob("*"))
    before = _snapshot(out)

    res = run_cli([*base, "--data_weights", "1", "3", "--max_steps", "2"], cache, check=False)
    shown = f"exit {res.returncode}\n--- stderr (tail)\n{res.stderr[-4000:]}"
    assert_one_readable_error(res.returncode, res.stderr, shown)
    assert_on_one_line(res.stderr, (("checkpoints/step_1", "another selection of the data", "--data_weights"),),
                       shown)
    assert _snapshot(out) == before, f"the refused resume changed out_dir\n{shown}"
