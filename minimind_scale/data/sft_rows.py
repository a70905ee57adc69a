"""Rows of the supervised fine-tuning family (full_sft, lora, distill): conversations, with MiniMind's augmentations,
and replayed pretraining texts.

Two augmentations apply as conversations are tokenised: a system prompt drawn from ten assistant prompts for
a share of the records that have none (and no tools), and the removal of the empty think block of replies
without reasoning from most records, so the model learns to answer both with and without it. Each is decided
per record from --seed and the record's file and line, so every prepare of the same data gives the same rows.
A stage of the family declares the two ratios in its config (with its own defaults), puts AUGMENTATION_FIELDS
in its data_fields, and AUGMENTATIONS_OFF in its eval_overrides.

Pretraining records ({"text": ...}) may sit among the conversations, in the same file or another, to replay
pretraining data against forgetting: each is encoded exactly as the pretrain stage encodes it (data/text_rows.py),
a label on every token, and never augmented.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

from minimind_scale.chat.encoding import encode_chat, encode_chats
from minimind_scale.chat.markup import EMPTY_THINK, THINK_OPEN
from minimind_scale.chat.messages import CONVERSATION_KEYS, normalize_messages
from minimind_scale.chat.template import render_chat
from minimind_scale.data.batching import pad_collate, padded_length
from minimind_scale.data.record_draws import RecordPosition
from minimind_scale.data.text_rows import TEXT_KEY, encode_text, encode_texts, record_text
from minimind_scale.errors import RecordError

AddSystemRatio = Annotated[float, Field(
    ge=0, le=1, description="share of conversations without a system turn or tools that get a system prompt drawn "
    "from ten zh/en assistant prompts (decided per record from seed, file and line)")]
EmptyThinkRatio = Annotated[float, Field(
    ge=0, le=1, description=f"share of conversations that keep the empty {THINK_OPEN} block of replies without "
    "reasoning; the others have it removed (decided per record from seed, file and line)")]
# The options the augmentations read: they change the tokenised rows, so they join the cache key.
AUGMENTATION_FIELDS = ("add_system_ratio", "empty_think_ratio", "seed")
# The ratios at which the augmentations leave every record as it is written (for measuring, not training).
AUGMENTATIONS_OFF = {"add_system_ratio": 0.0, "empty_think_ratio": 1.0}
# The record keys a row is read from: a conversation's (chat.messages.normalize_messages), either one, or a
# pretraining record's text.
RECORD_KEYS = (*CONVERSATION_KEYS, TEXT_KEY)

SYSTEM_PROMPTS = (
    "你是一个乐于助人、回答准确的智能助手。",
    "你是一位知识丰富的AI助手，请用清晰简洁的语言回答用户的问题。",
    "你是一个友好的对话助手，会认真理解用户的需求并给出有用的回复。",
    "作为AI助手，你应当诚实、耐心，并尽力提供可靠的信息。",
    "你是一个小型语言模型助手，擅长用中文和英文与人交流。",
    "You are a helpful assistant that answers accurately and concisely.",
    "You are a friendly AI assistant. Work out what the user needs and reply clearly.",
    "You are a knowledgeable assistant; give honest, well-organised answers.",
    "As an AI assistant, you help people with questions, writing and reasoning.",
    "You are a small but capable language model assistant who speaks English and Chinese.",
)


def augmented(messages: list[dict], tools: list | None, tokenizer, cfg,
              position: RecordPosition | None) -> tuple[list[dict], str]:
    """The conversation with MiniMind's augmentations, and its rendering: maybe a system prompt first,
    maybe the empty think blocks cut from the rendered text (so labels follow the text as stored).
    A record without a position (encoded outside data preparation) is left as it is."""
    if (position is not None and tools is None and messages[0]["role"] != "system"
            and position.draw(cfg.seed, "add_system") < cfg.add_system_ratio):
        prompt = position.choice(cfg.seed, "system_prompt", SYSTEM_PROMPTS)
        messages = [{"role": "system", "content": prompt}, *messages]
    text = render_chat(messages, tools, tokenizer)
    if position is not None and position.draw(cfg.seed, "empty_think") >= cfg.empty_think_ratio:
        text = text.replace(EMPTY_THINK, "")
    return messages, text


def is_text_record(record) -> bool:
    """Whether `record` is a pretraining record: a "text" and no conversation (which would take precedence)."""
    return isinstance(record, dict) and TEXT_KEY in record and not any(k in record for k in CONVERSATION_KEYS)


def checked_conversation(record) -> tuple[list[dict], list | None]:
    """A conversation record's (messages, tools); a record in neither accepted format gets a RecordError
    naming both."""
    if isinstance(record, dict) and not any(k in record for k in RECORD_KEYS):
        raise RecordError("record", "neither a conversation ({\"conversations\": [...]} or {\"messages\": [...]}) "
                          "nor a pretraining text ({\"text\": \"...\"})")
    return normalize_messages(record)


def encode(record: dict, tokenizer, cfg, position: RecordPosition | None = None) -> dict:
    """One record as a row: a conversation with labels on the assistant replies only, or a pretraining
    text with a label on every token."""
    if is_text_record(record):
        return encode_text(record_text(record), tokenizer, cfg.max_seq_len)
    messages, tools = checked_conversation(record)
    messages, text = augmented(messages, tools, tokenizer, cfg, position)
    return encode_chat(messages, tools, tokenizer, cfg.max_seq_len, text)


def encode_batch(records: list[dict], tokenizer, cfg,
                 positions: list[RecordPosition] | None = None) -> list[dict | RecordError]:
    """`encode` of each record: the valid conversations rendered one by one, then tokenised in one call, and
    the pretraining texts tokenised in another."""
    out: list = [None] * len(records)
    conversations, rendered, conversation_at = [], [], []
    texts, text_at = [], []
    for i, record in enumerate(records):
        try:
            if is_text_record(record):
                texts.append(record_text(record))
                text_at.append(i)
                continue
            messages, tools = checked_conversation(record)
        except RecordError as e:
            out[i] = e
            continue
        messages, text = augmented(messages, tools, tokenizer, cfg, None if positions is None else positions[i])
        conversations.append((messages, tools))
        rendered.append(text)
        conversation_at.append(i)
    for i, row in zip(conversation_at, encode_chats(conversations, tokenizer, cfg.max_seq_len, rendered)):
        out[i] = row
    for i, row in zip(text_at, encode_texts(texts, tokenizer, cfg.max_seq_len)):
        out[i] = row
    return out


def collate(rows, tokenizer, cfg):
    """Rows padded (or packed rows) into one causal-LM batch, to max_seq_len where the config asks for it."""
    return pad_collate(rows, tokenizer.pad_token_id, padded_length(cfg))
