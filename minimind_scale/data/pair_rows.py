"""Rows and batches of preference pairs (dpo, reward): {"chosen": [messages], "rejected": [messages]} records.

A row holds both sides tokenised (`chosen_input_ids`, `chosen_labels`, `rejected_...`). A batch holds the
chosen conversations first, then the rejected ones, in the same order, so a pair is never split across
micro-batches and `split_pairs` takes any per-row tensor of the batch back to its two sides.
"""
from __future__ import annotations

import torch

from minimind_scale.chat.encoding import encode_chats
from minimind_scale.chat.messages import normalize_messages
from minimind_scale.data.batching import pad_collate, padded_length
from minimind_scale.data.loader import ROW_INDEX
from minimind_scale.data.rows import IGNORE_INDEX, NO_LOSS
from minimind_scale.errors import RecordError

SIDES = ("chosen", "rejected")
# The record keys that identify a preference pair.
RECORD_KEYS = SIDES


def encode(record: dict, tokenizer, cfg) -> dict:
    """One preference record as a row of both sides, labelled on their assistant replies."""
    result = encode_batch([record], tokenizer, cfg)[0]
    if isinstance(result, RecordError):
        raise result
    return result


def encode_batch(records: list[dict], tokenizer, cfg) -> list[dict | RecordError]:
    """`encode` of each record, with every valid side of every pair tokenised in one call. The checks run in
    `encode`'s order (chosen's shape, chosen's loss tokens, rejected's, then sameness), so a record gets the
    error `encode` would raise first."""
    sides: list[dict] = []  # per record: side -> (messages, tools) or the RecordError normalising it gave
    conversations = []
    for record in records:
        per_side = {}
        for side in SIDES:
            try:
                per_side[side] = normalize_messages(record, key=side)
                conversations.append(per_side[side])
            except RecordError as e:
                per_side[side] = e
        sides.append(per_side)
    encoded = iter(encode_chats(conversations, tokenizer, cfg.max_seq_len))
    out: list = []
    for per_side in sides:
        encodings = {side: next(encoded) for side in SIDES if not isinstance(per_side[side], RecordError)}
        out.append(_pair_row(per_side, encodings, cfg))
    return out


def _pair_row(per_side: dict, encodings: dict, cfg) -> dict | RecordError:
    out = {}
    for side in SIDES:
        if isinstance(per_side[side], RecordError):
            return per_side[side]
        enc = encodings[side]
        if all(x == IGNORE_INDEX for x in enc["labels"]):
            return RecordError(side, f"{NO_LOSS} within max_seq_len {cfg.max_seq_len}")
        out[f"{side}_input_ids"] = enc["input_ids"]
        out[f"{side}_labels"] = enc["labels"]
    if per_side["chosen"] == per_side["rejected"]:
        return RecordError("rejected", "is identical to chosen (a preference pair must differ)")
    return out


def collate(rows, tokenizer, cfg):
    """Chosen rows first, then rejected, padded together: a pair can never be split across micro-batches.
    Rows' positions in the data set (loader.ROW_INDEX), where they have them, ride along, one per pair."""
    sides = [{"input_ids": r[f"{s}_input_ids"], "labels": r[f"{s}_labels"]} for s in SIDES for r in rows]
    batch = pad_collate(sides, tokenizer.pad_token_id, padded_length(cfg))
    if ROW_INDEX in rows[0]:
        batch[ROW_INDEX] = torch.tensor([r[ROW_INDEX] for r in rows], dtype=torch.long)
    return batch


def count_pairs(batch: dict) -> int:
    """The pairs of a collated batch: its loss units."""
    return batch["input_ids"].shape[0] // 2


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) halves of a per-row tensor of a collated batch."""
    n = values.shape[0] // 2
    return values[:n], values[n:]
