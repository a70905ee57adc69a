"""Pretraining records ({"text": ...}) replayed inside the SFT family's data (full_sft, lora, distill).

A text record must give exactly the row pretrain gives it (bos + text + eos, a label on every token), with no
SFT augmentation; a conversation beside it must keep the row it gets alone; a record of neither format is
refused with a message naming both; and `full_sft` trains on a mix, counting every record in data_report.json.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from conftest import SHARED, reference_labels, run_cli
from minimind_scale.chat.markup import EMPTY_THINK
from minimind_scale.chat.messages import normalize_messages
from minimind_scale.chat.template import render_chat
from minimind_scale.data import sft_rows
from minimind_scale.data.record_draws import RecordPosition
from minimind_scale.errors import RecordError
from minimind_scale.inference.evaluate import detect_stage
from minimind_scale.models.build import load_tokenizer
from minimind_scale.training.registry import discover, get_stage

DATA = SHARED / "data"
TOKENIZER = SHARED / "tokenizers" / "minimind"
SFT_FILE = DATA / "sft_identity.jsonl"
TEXT_FILE = DATA / "pretrain_en_c4wiki.jsonl"
pytestmark = pytest.mark.skipif(not (SFT_FILE.is_file() and TEXT_FILE.is_file() and TOKENIZER.is_dir()),
                                reason="../shared data or tokenizer absent")
SFT_STAGES = ("full_sft", "lora", "distill")
# Augmentations at their most active: every conversation gets a system prompt and loses its empty think block.
ALL_AUGMENTED = {"add_system_ratio": 1.0, "empty_think_ratio": 0.0}


@pytest.fixture(autouse=True, scope="module")
def _stages():
    discover()


@functools.cache
def _tok():
    return load_tokenizer(str(TOKENIZER))


def _records(path: Path, n: int) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n] if line.strip()]


def _texts() -> list[dict]:
    """Shared pretraining texts (most longer than 64 tokens), and one holding an empty think block that an
    SFT augmentation would cut from a conversation."""
    return [*_records(TEXT_FILE, 5), {"text": f"A note that quotes {EMPTY_THINK}verbatim."}]


def _conversations() -> list[dict]:
    return _records(SFT_FILE, 6)


def _cfg(stage: str, tmp_path: Path, **fields):
    """The stage's config; lora needs a model directory name and distill a teacher, neither loaded here."""
    if stage == "lora":
        fields["model"] = "some/model_dir"
    if stage == "distill":
        (tmp_path / "teacher").mkdir(exist_ok=True)
        (tmp_path / "teacher" / "config.json").write_text("{}")
        fields["teacher"] = str(tmp_path / "teacher")
    return get_stage(stage).config(**fields)


def _expected_text_row(text: str, max_seq_len: int) -> dict:
    """Pretrain's encoding, computed here: bos, the text's tokens, eos, cut to max_seq_len, labels = ids."""
    tok = _tok()
    ids = ([tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id])[:max_seq_len]
    return {"input_ids": ids, "labels": ids}


def _outcome(result):
    """A row as it is, a RecordError as (field, reason), so outcomes compare with ==."""
    return (result.field, result.reason) if isinstance(result, RecordError) else result


def _encode_each(spec, records, cfg, positions) -> list:
    out = []
    for record, position in zip(records, positions):
        try:
            out.append(spec.encode(record, _tok(), cfg, position=position))
        except RecordError as e:
            out.append(e)
    return [_outcome(r) for r in out]


@pytest.mark.parametrize("stage", SFT_STAGES)
def test_a_text_record_gets_pretrains_row(stage, tmp_path):
    """Through encode and encode_batch, with and without positions and under every augmentation, a text record's
    row is pretrain's row of it; 64 tokens cut most of the texts, so truncation is covered."""
    cfg = _cfg(stage, tmp_path, max_seq_len=64, **ALL_AUGMENTED)
    spec, pretrain = get_stage(stage), get_stage("pretrain")
    pretrain_cfg = pretrain.config(max_seq_len=64)
    records = _texts()
    expected = [_expected_text_row(r["text"], 64) for r in records]
    assert any(len(_tok()(r["text"], add_special_tokens=False).input_ids) > 64 for r in records)
    assert [pretrain.encode(r, _tok(), pretrain_cfg) for r in records] == expected
    assert pretrain.encode_batch(records, _tok(), pretrain_cfg) == expected
    positions = [RecordPosition(0, n) for n in range(1, len(records) + 1)]
    assert [spec.encode(r, _tok(), cfg) for r in records] == expected
    assert _encode_each(spec, records, cfg, positions) == expected
    assert spec.encode_batch(records, _tok(), cfg) == expected
    assert spec.encode_batch(records, _tok(), cfg, positions=positions) == expected


@pytest.mark.parametrize("stage", SFT_STAGES)
def test_a_mixed_batch_equals_its_records_one_by_one(stage, tmp_path):
    """Conversations, texts and bad records interleaved: encode_batch equals encode record by record; each
    conversation keeps the row it gets in a batch of conversations only, each text gets pretrain's row."""
    spec = get_stage(stage)
    cfg = _cfg(stage, tmp_path, max_seq_len=256)
    conversations, texts = _conversations(), _texts()
    bad = [{"text": ""}, {"prompt": "no known key"}, {"conversations": []}]
    records = [r for trio in zip(conversations, texts, bad + [None] * len(texts)) for r in trio if r is not None]
    positions = [RecordPosition(1, 10 * n) for n in range(len(records))]
    mixed = [_outcome(r) for r in spec.encode_batch(records, _tok(), cfg, positions=positions)]
    assert mixed == _encode_each(spec, records, cfg, positions)
    assert [_outcome(r) for r in spec.encode_batch(records, _tok(), cfg)] == \
        _encode_each(spec, records, cfg, [None] * len(records))

    where = {id(r): i for i, r in enumerate(records)}
    at = [where[id(c)] for c in conversations]
    alone = spec.encode_batch(conversations, _tok(), cfg, positions=[positions[i] for i in at])
    assert [mixed[i] for i in at] == alone
    assert [mixed[where[id(t)]] for t in texts] == [_expected_text_row(t["text"], 256) for t in texts]
    assert all(isinstance(mixed[where[id(b)]], tuple) for b in bad)


def test_conversation_rows_are_their_records_rendered(tmp_path):
    """Independent of encode_chat: with the augmentations off, a conversation mixed with texts is its record
    rendered by the template, tokenised, and labelled by MiniMind's token-id rule."""
    spec = get_stage("full_sft")
    cfg = _cfg("full_sft", tmp_path, max_seq_len=4096, **sft_rows.AUGMENTATIONS_OFF)
    conversations = _conversations()
    records = [r for pair in zip(conversations, _texts()) for r in pair]
    positions = [RecordPosition(0, n) for n in range(1, len(records) + 1)]
    rows = spec.encode_batch(records, _tok(), cfg, positions=positions)
    for record, row in zip(conversations, rows[::2]):
        ids = _tok()(render_chat(*normalize_messages(record), _tok()), add_special_tokens=False).input_ids
        assert row == {"input_ids": ids, "labels": reference_labels(ids, _tok())}


def test_a_record_with_both_keys_is_a_conversation(tmp_path):
    cfg = _cfg("full_sft", tmp_path, max_seq_len=256)
    conversation = _conversations()[0]
    both = {**conversation, "text": "ignored beside a conversation"}
    assert sft_rows.encode(both, _tok(), cfg) == sft_rows.encode(conversation, _tok(), cfg)


@pytest.mark.parametrize("stage", SFT_STAGES)
@pytest.mark.parametrize("record", [{"prompt": "hi", "answer": "hello"}, {}])
def test_a_record_of_neither_format_names_both(stage, record, tmp_path):
    spec = get_stage(stage)
    cfg = _cfg(stage, tmp_path, max_seq_len=64)
    with pytest.raises(RecordError) as info:
        spec.encode(record, _tok(), cfg)
    [batched] = spec.encode_batch([record], _tok(), cfg)
    assert isinstance(batched, RecordError) and str(batched) == str(info.value)
    for key in ("conversations", "messages", "text"):
        assert f'"{key}"' in info.value.reason


def test_text_is_a_record_key_and_auto_eval_still_picks_pretrain_for_text(tmp_path):
    assert "text" in sft_rows.RECORD_KEYS
    for stage in SFT_STAGES:
        assert get_stage(stage).recognizes({"text": "x"}) and get_stage(stage).recognizes(_conversations()[0])
    texts_first = tmp_path / "texts_first.jsonl"
    texts_first.write_text("".join(json.dumps(r) + "\n" for r in [*_texts()[:1], *_conversations()[:1]]))
    conversations_first = tmp_path / "conversations_first.jsonl"
    conversations_first.write_text("".join(json.dumps(r) + "\n" for r in [*_conversations()[:1], *_texts()[:1]]))
    assert detect_stage(str(texts_first)) == "pretrain"
    assert detect_stage(str(conversations_first)) == "full_sft"


@pytest.mark.parametrize("packing", ["false", "true"])
def test_full_sft_trains_on_conversations_and_texts(packing, tmp_path):
    """A file mixing conversations and texts plus a file of texts only: a tiny full_sft run finishes, and its
    data_report.json counts every record and the tokens an independent encoding gives them."""
    conversations, texts = _conversations(), _records(TEXT_FILE, 8)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for pair in zip(conversations, texts) for r in pair))
    replay = tmp_path / "replay.jsonl"
    replay.write_text("".join(json.dumps(r) + "\n" for r in texts[len(conversations):]))
    out = tmp_path / "run"
    run_cli(["full_sft", "--model", "minimind2-small", "--tokenizer", str(TOKENIZER), "--hidden_size", "32",
             "--num_hidden_layers", "1", "--data_path", str(mixed), str(replay), "--max_steps", "2",
             "--batch_size", "2", "--max_seq_len", "128", "--packing", packing, "--dtype", "fp32",
             "--num_proc", "1", "--save_interval", "0", "--log_interval", "1", "--out_dir", str(out),
             "--cache_dir", str(tmp_path / "cache"), *_flags(sft_rows.AUGMENTATIONS_OFF)],
            tmp_path / "cache")
    report = json.loads((out / "data_report.json").read_text())
    assert report["records"] == len(conversations) + len(texts)
    assert report["skipped"] == report["too_long"] == 0
    conversation_tokens = [len(_tok()(render_chat(*normalize_messages(r), _tok()), add_special_tokens=False)
                               .input_ids[:128]) for r in conversations]
    text_tokens = [len(_expected_text_row(r["text"], 128)["input_ids"]) for r in texts]
    assert report["tokens"] == sum(conversation_tokens) + sum(text_tokens)
    assert (out / "final" / "model.safetensors").is_file()


def _flags(fields: dict) -> list[str]:
    return [item for name, value in fields.items() for item in (f"--{name}", str(value))]
