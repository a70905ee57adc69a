"""MiniMind's SFT augmentations (add_system_ratio, empty_think_ratio) on the shared real conversations.

Every check reads the rows prepare_dataset stored: each row's text must be its record rendered by the
tokenizer's template, with or without one of the ten system prompts and with or without the empty
<think> blocks, and nothing else; its labels must follow MiniMind's rule on the stored ids; the shares
must sit near the ratios; two prepares (on different worker counts) must agree.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SHARED, reference_labels
from minimind_scale.chat.encoding import encode_chat
from minimind_scale.chat.markup import EMPTY_THINK
from minimind_scale.chat.messages import normalize_messages
from minimind_scale.chat.template import render_chat
from minimind_scale.data.prepare import prepare_dataset
from minimind_scale.data.sft_rows import SYSTEM_PROMPTS
from minimind_scale.models.build import load_tokenizer
from minimind_scale.training.registry import discover, get_stage

SFT_FILES = sorted((SHARED / "data").glob("sft_*.jsonl"))
TOKENIZER = SHARED / "tokenizers" / "minimind"
pytestmark = pytest.mark.skipif(not SFT_FILES or not TOKENIZER.is_dir(), reason="../shared data or tokenizer absent")
LONG = 4096  # no shared conversation is truncated, so every row holds its whole record


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(TOKENIZER))


@pytest.fixture(scope="module")
def conversations() -> list[tuple[list[dict], list | None]]:
    return [normalize_messages(json.loads(line)) for path in SFT_FILES
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _prepare(tmp: Path, tok, stage: str = "full_sft", **fields) -> tuple[dict, Path]:
    discover()
    spec = get_stage(stage)
    if stage == "lora":
        fields["model"] = "some/model_dir"
    if stage == "distill":  # preparing data never loads the teacher
        (tmp / "teacher").mkdir(parents=True, exist_ok=True)
        (tmp / "teacher" / "config.json").write_text("{}")
        fields["teacher"] = str(tmp / "teacher")
    cfg = spec.config(data_path=[str(p) for p in SFT_FILES], cache_dir=str(tmp / "cache"), packing=False,
                      max_seq_len=LONG, tokenizer=str(TOKENIZER), **fields)
    ds, target, report = prepare_dataset(spec, cfg, tok, log=lambda *_: None)
    assert report.records == len(ds) and report.skipped == report.too_long == 0
    return ds.to_dict(), target


@pytest.fixture(scope="module")
def augmented_rows(tmp_path_factory, tok) -> dict:
    rows, _ = _prepare(tmp_path_factory.mktemp("default"), tok, num_proc=2)
    return rows


def _variant(ids: list[int], messages: list[dict], tools, tok) -> tuple[bool, bool]:
    """(system prompt added, empty <think> kept) for one stored row; fails unless the row is exactly its
    record rendered that way."""
    text = tok.decode(ids, skip_special_tokens=False)
    added = next((p for p in SYSTEM_PROMPTS if text.startswith(f"<|im_start|>system\n{p}<|im_end|>\n")), None)
    if added is not None:
        assert messages[0]["role"] != "system" and tools is None, "a system prompt was added where one was not allowed"
        messages = [{"role": "system", "content": added}, *messages]
    expected = render_chat(messages, tools, tok)
    kept = EMPTY_THINK in text
    if not kept:
        expected = expected.replace(EMPTY_THINK, "")
    assert text == expected
    assert ids == tok(expected, add_special_tokens=False).input_ids
    return added is not None, kept


def test_rows_are_their_records_augmented_and_labelled_by_minimind_rule(augmented_rows, conversations, tok):
    assert len(augmented_rows["input_ids"]) == len(conversations)
    added, eligible, kept, with_block = 0, 0, 0, 0
    prompts_seen = set()
    for ids, labels, (messages, tools) in zip(augmented_rows["input_ids"], augmented_rows["labels"], conversations):
        assert labels == reference_labels(ids, tok)
        got_system, got_block = _variant(ids, messages, tools, tok)
        if messages[0]["role"] != "system" and tools is None:
            eligible += 1
            added += got_system
            if got_system:
                prompts_seen.add(tok.decode(ids).split("\n", 2)[1])
        if EMPTY_THINK in render_chat(messages, tools, tok):
            with_block += 1
            kept += got_block
    assert eligible > 1500 and with_block > 1500
    assert abs(added / eligible - 0.2) <= 0.08, added / eligible
    assert abs(kept / with_block - 0.2) <= 0.08, kept / with_block
    assert len(prompts_seen) == len(SYSTEM_PROMPTS)  # every prompt of the list is drawn


def test_two_prepares_agree_and_the_options_are_in_the_cache_key(augmented_rows, tmp_path, tok):
    again, target = _prepare(tmp_path / "again", tok, num_proc=1)  # other batching, other worker count
    assert again == augmented_rows
    other_seed, seed_target = _prepare(tmp_path / "seed", tok, num_proc=1, seed=7)
    assert other_seed != augmented_rows and seed_target.name != target.name
    _, ratio_target = _prepare(tmp_path / "ratio", tok, num_proc=1, add_system_ratio=0.5)
    assert ratio_target.name != target.name


def test_zero_and_one_give_the_rows_of_plain_encoding(conversations, tmp_path, tok):
    rows, _ = _prepare(tmp_path, tok, num_proc=1, add_system_ratio=0.0, empty_think_ratio=1.0)
    plain = [encode_chat(messages, tools, tok, LONG) for messages, tools in conversations]
    assert rows == {"input_ids": [r["input_ids"] for r in plain], "labels": [r["labels"] for r in plain]}


def test_one_and_zero_augment_every_record_that_allows_it(conversations, tmp_path, tok):
    rows, _ = _prepare(tmp_path, tok, num_proc=1, add_system_ratio=1.0, empty_think_ratio=0.0)
    for ids, (messages, tools) in zip(rows["input_ids"], conversations):
        got_system, got_block = _variant(ids, messages, tools, tok)
        assert got_system == (messages[0]["role"] != "system" and tools is None)
        assert not got_block


@pytest.mark.parametrize("stage", ["lora", "distill"])
def test_lora_and_distill_augment_alike(stage, augmented_rows, tmp_path, tok):
    rows, _ = _prepare(tmp_path, tok, stage=stage, num_proc=1)
    assert rows == augmented_rows
