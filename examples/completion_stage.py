"""A user's own stage: prompt/completion pairs, loss on the completion only.

    python -m minimind_scale --plugin examples/completion_stage.py completion --help
    python -m minimind_scale --plugin examples/completion_stage.py completion --data_path pairs.jsonl --model tiny

Records: {"prompt": "...", "completion": "..."}. The README shows this file and docs/plugins.md explains
each part; tests/test_plugin.py runs it.
"""
from pydantic import Field

from minimind_scale import (
    IGNORE_INDEX,
    LearningRate,
    RecordError,
    StageSpec,
    TrainConfig,
    causal_lm_loss,
    count_label_tokens,
    pad_collate,
    register_stage,
)


class CompletionConfig(TrainConfig):
    learning_rate: LearningRate = 1e-4  # a new default; the constraint and description stay TrainConfig's
    separator: str = Field("\n", description="text placed between prompt and completion")


def encode(record, tokenizer, cfg):
    for key in ("prompt", "completion"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise RecordError(key, "must be a non-empty string")
    prompt = [tokenizer.bos_token_id] + tokenizer(record["prompt"] + cfg.separator)["input_ids"]
    answer = tokenizer(record["completion"])["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt + answer)[: cfg.max_seq_len]
    labels = ([IGNORE_INDEX] * len(prompt) + answer)[: cfg.max_seq_len]
    return {"input_ids": ids, "labels": labels}


register_stage(StageSpec(
    name="completion",
    help="prompt -> completion pairs, loss on the completion",
    config=CompletionConfig,
    encode=encode,
    collate=lambda rows, tokenizer, cfg: pad_collate(rows, tokenizer.pad_token_id),
    loss=causal_lm_loss,
    loss_units=count_label_tokens,
    cross_entropy_variants=True,  # causal_lm_loss honours --cross_entropy chunked|liger
    data_fields=("separator",),  # changes the tokens, so it is part of the cache key
))
