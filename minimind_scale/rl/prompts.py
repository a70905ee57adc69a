"""Prompt records for online RL: one jsonl record -> the prompt's messages and ids, and a left-padded batch.

A record is MiniMind's rlaif format (a conversation whose trailing assistant turn is a placeholder),
or `prompt` as text or messages; every other key rides along as a reward-function column.
"""
from __future__ import annotations

import hashlib
import json

from minimind_scale.chat.encoding import encode_prompt, encode_prompts
from minimind_scale.chat.messages import normalize_messages
from minimind_scale.errors import RecordError
from minimind_scale.generation.padding import left_pad

PROMPT_KEYS = ("prompt", "conversations", "messages")


def prompt_messages(record: dict) -> tuple[list[dict], list | None]:
    """The prompt of a record: its conversation without a trailing assistant turn, or `prompt`."""
    key = next((k for k in PROMPT_KEYS if k in record), None)
    if key is None:
        raise RecordError("prompt", "missing (a prompt record has \"prompt\" or \"conversations\")")
    turns = record[key]
    if key == "prompt" and isinstance(turns, str):
        if not turns.strip():
            raise RecordError("prompt", "is empty")
        return [{"role": "user", "content": turns}], None
    if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant":
        turns = turns[:-1]  # the answer to be generated; MiniMind's rlaif file carries a placeholder
    messages, tools = normalize_messages({**record, key: turns}, key=key, require_assistant=False)
    if not any(m["role"] == "user" for m in messages):
        raise RecordError("prompt", "has no user turn")
    return messages, tools


def thinking_open(messages: list[dict], cfg) -> bool:
    """Whether this prompt is rendered with open_thinking: fixed per prompt and seed, so caches and resumes agree."""
    digest = hashlib.blake2b(f"{cfg.seed}:{json.dumps(messages, sort_keys=True)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < cfg.thinking_ratio


def encode(record: dict, tokenizer, cfg) -> dict:
    """Prompt ids (their end kept when too long), the messages as JSON, and the record's other keys as JSON."""
    messages, tools = prompt_messages(record)
    ids = encode_prompt(messages, tools, tokenizer, open_thinking=thinking_open(messages, cfg))
    return _row(record, messages, ids, {}, cfg)


def _row(record: dict, messages: list[dict], ids: list[int], extra: dict, cfg) -> dict:
    columns = {k: v for k, v in record.items() if k not in PROMPT_KEYS}
    columns.update(extra)
    return {"prompt_ids": ids[-cfg.max_prompt_len:], "prompt": json.dumps(messages, ensure_ascii=False),
            "columns": json.dumps(columns, ensure_ascii=False)}


def _plain_prompt(record: dict) -> tuple[list[dict], list | None, dict]:
    return (*prompt_messages(record), {})


def encode_batch(records: list[dict], tokenizer, cfg, prompt_of=_plain_prompt) -> list[dict | RecordError]:
    """`encode` of each record, or the RecordError it raises for it (returned, not raised): the valid
    prompts rendered and tokenised in one call (chat.encoding.encode_prompts), each with its own
    open_thinking. `prompt_of(record)` -> (messages, tools, extra reward columns)."""
    out: list = [None] * len(records)
    parts, where = [], []
    for i, record in enumerate(records):
        try:
            parts.append(prompt_of(record))
            where.append(i)
        except RecordError as e:
            out[i] = e
    prompts = [(messages, tools) for messages, tools, _ in parts]
    thinking = [{"open_thinking": thinking_open(messages, cfg)} for messages, _ in prompts]
    for i, (messages, _, extra), ids in zip(where, parts, encode_prompts(prompts, tokenizer, thinking)):
        out[i] = _row(records[i], messages, ids, extra, cfg)
    return out


# The non-token columns `encode` writes, for StageSpec.value_columns.
VALUE_COLUMNS = {"prompt": "string", "columns": "string"}
# The options `encode` depends on, for StageSpec.data_fields (the cache key).
DATA_FIELDS = ("max_prompt_len", "thinking_ratio", "seed")


def collate(rows, tokenizer, cfg) -> dict:
    """Prompts left-padded, so generation starts at the same column for every row; their messages and
    extra record keys (the reward functions' columns) ride along."""
    ids, mask = left_pad([r["prompt_ids"] for r in rows], tokenizer.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask, "prompts": [json.loads(r["prompt"]) for r in rows],
            "columns": [json.loads(r["columns"]) for r in rows]}
