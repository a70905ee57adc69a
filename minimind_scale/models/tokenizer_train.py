"""Train a byte-level BPE tokenizer that is a drop-in replacement for MiniMind's.

"Drop-in" means: the same special / added token strings at the same ids (0..35), the same
bos/eos/pad/unk, the same ByteLevel pre-tokenizer and decoder, and a chat template whose rendered
text equals MiniMind's for every conversation that template accepts (`chat.template.CHAT_TEMPLATE`).
Models, data pipelines and loss masks built for MiniMind's tokenizer therefore work unchanged with one
trained here.

The default tokenizer shipped in `minimind_scale/assets/tokenizer/` was made from the demo data
(see `minimind_scale/data/demo_data.py`) with, from the repository root:

    python -m minimind_scale.data.demo_data
    python -c "from minimind_scale.models.tokenizer_train import TrainTokenizerConfig, run; \
run(TrainTokenizerConfig(data_path=['minimind_scale/assets/demo/pretrain.jsonl', \
'minimind_scale/assets/demo/sft.jsonl'], vocab_size=1024, out_dir='minimind_scale/assets/tokenizer'))"
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import Field

from minimind_scale.chat.markup import (
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_RESPONSE_CLOSE,
    TOOL_RESPONSE_OPEN,
    TURN_END,
    TURN_START,
)
from minimind_scale.chat.messages import CONVERSATION_KEYS
from minimind_scale.chat.template import CHAT_TEMPLATE
from minimind_scale.config import StrictConfig
from minimind_scale.errors import UserError

# MiniMind's token table for ids 0..35 (the order is the id). Ids 0..20 are special (dropped by
# `skip_special_tokens`); 21..35 are ordinary added tokens, so tool calls and thinking markers
# survive decoding, which the tool-call and reasoning parsers rely on.
SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",
    TURN_START,
    TURN_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|audio_pad|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
]
ADDED_TOKENS: list[str] = [
    TOOL_CALL_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_RESPONSE_OPEN,
    TOOL_RESPONSE_CLOSE,
    THINK_OPEN,
    THINK_CLOSE,
] + [f"<|buffer{i}|>" for i in range(1, 10)]
RESERVED_TOKENS: list[str] = SPECIAL_TOKENS + ADDED_TOKENS

BOS_TOKEN = TURN_START
EOS_TOKEN = TURN_END
PAD_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<|endoftext|>"


class TrainTokenizerConfig(StrictConfig):
    """Options of `python -m minimind_scale train-tokenizer`."""

    data_path: list[str] = Field(
        ..., min_length=1,
        description="jsonl files to learn from: `text` records and/or `conversations` / `messages` records",
    )
    vocab_size: int = Field(
        6400, ge=64,
        description="target vocabulary size, reserved tokens included (BPE may stop earlier on a small corpus)",
    )
    out_dir: str = Field(
        ..., description="directory the tokenizer is saved to (loads with AutoTokenizer.from_pretrained)",
    )


def _record_texts(record: object) -> Iterator[str]:
    if not isinstance(record, dict):
        return
    text = record.get("text")
    if isinstance(text, str):
        yield text
    for key in CONVERSATION_KEYS:
        turns = record.get(key)
        if not isinstance(turns, list):
            continue
        for turn in turns:
            if not isinstance(turn, dict):
                continue
            for field in ("content", "reasoning_content"):
                value = turn.get(field)
                if isinstance(value, str):
                    yield value


def iter_texts(paths: list[str], stats: dict[str, int]) -> Iterator[str]:
    """Yield every text of the files one line at a time; `stats` counts texts and characters.

    Streaming matters: tokenizer corpora are often larger than memory.
    """
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}, line {lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise UserError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
                for text in _record_texts(record):
                    if text:
                        stats["texts"] += 1
                        stats["chars"] += len(text)
                        yield text


def build_tokenizer(texts: Iterator[str], vocab_size: int):
    """Train the BPE on `texts` and wrap it as a `PreTrainedTokenizerFast` with MiniMind's layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=RESERVED_TOKENS,
        # Every byte gets a token even if the corpus lacks it, so any text round-trips.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)

    # The trainer registers every reserved token as special; MiniMind's ids 21..35 are not special.
    spec = json.loads(tok.to_str())
    plain = set(ADDED_TOKENS)
    for entry in spec["added_tokens"]:
        entry["normalized"] = False
        entry["special"] = entry["content"] not in plain
    tok = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    for token_id, token in enumerate(RESERVED_TOKENS):
        if tok.token_to_id(token) != token_id:
            raise RuntimeError(f"tokenizer training put {token!r} at id {tok.token_to_id(token)}, expected {token_id}")

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD_TOKEN,)],
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def run(cfg: TrainTokenizerConfig) -> None:
    """Train on `cfg.data_path` and save to `cfg.out_dir`."""
    for path in cfg.data_path:
        if not Path(path).is_file():
            raise UserError(f"{path}: data file not found")
    start = time.perf_counter()
    stats = {"texts": 0, "chars": 0}
    fast = build_tokenizer(iter_texts(cfg.data_path, stats), cfg.vocab_size)
    if stats["texts"] == 0:
        raise UserError(
            f"{', '.join(cfg.data_path)}: no text found (expected `text` or `conversations` / `messages` records)"
        )
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    # The template goes into tokenizer_config.json (as in MiniMind's tokenizer) rather than a separate
    # chat_template.jinja, so tools that read only that file still find it.
    fast.save_pretrained(cfg.out_dir, save_jinja_files=False)
    seconds = time.perf_counter() - start
    print(
        f"tokenizer: vocab {len(fast)} (asked {cfg.vocab_size}) from {stats['texts']} texts "
        f"({stats['chars']} chars) in {len(cfg.data_path)} file(s), {seconds:.1f} s -> {cfg.out_dir}"
    )
