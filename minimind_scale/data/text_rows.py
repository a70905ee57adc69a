"""Rows of raw text ({"text": ...}): `[bos] + tokens + [eos]`, cut to max_seq_len, with a label on every token.

The pretrain stage's encoding, kept here so that the SFT family encodes pretraining records mixed into its
data (replay against forgetting) exactly as pretrain does.
"""
from __future__ import annotations

from minimind_scale.errors import RecordError

# The record key raw text is read from.
TEXT_KEY = "text"


def record_text(record: dict) -> str:
    """The text of a pretraining record, or a RecordError saying what is wrong with it."""
    text = record.get(TEXT_KEY)
    if text is None:
        raise RecordError(TEXT_KEY, "missing (a pretraining record is {\"text\": \"...\"})")
    if not isinstance(text, str) or not text.strip():
        raise RecordError(TEXT_KEY, "must be a non-empty string")
    return text


def text_row(ids: list[int], bos: int, eos: int, max_seq_len: int) -> dict:
    """Token ids of one text as a row: framed by bos and eos, cut to max_seq_len, labels on every token."""
    ids = ([bos] + ids + [eos])[:max_seq_len]
    return {"input_ids": ids, "labels": list(ids)}


def encode_text(text: str, tokenizer, max_seq_len: int) -> dict:
    """One text as a row (see text_row)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text_row(ids, tokenizer.bos_token_id, tokenizer.eos_token_id, max_seq_len)


def encode_texts(texts: list[str], tokenizer, max_seq_len: int) -> list[dict]:
    """`encode_text` of each text, with one tokenizer call for the whole list."""
    if not texts:
        return []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    batch = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)
    return [text_row(ids, bos, eos, max_seq_len) for ids in batch["input_ids"]]
