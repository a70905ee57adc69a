"""pretrain: next-token prediction on raw text ({"text": ...}), loss on every real token."""
from minimind_scale import StageSpec, TrainConfig, register_stage
from minimind_scale.batching import pad_collate, padded_length
from minimind_scale.config import AccumulationSteps, BatchSize, OutDir, Packing
from minimind_scale.errors import RecordError
from minimind_scale.losses import causal_lm_loss, count_label_tokens


class PretrainConfig(TrainConfig):
    """MiniMind's pretraining defaults: lr 5e-4, 8-step accumulation, 512-token rows."""

    batch_size: BatchSize = 32
    accumulation_steps: AccumulationSteps = 8
    packing: Packing = True
    out_dir: OutDir = "out/pretrain"


def encode(record: dict, tokenizer, cfg) -> dict:
    text = record.get("text")
    if text is None:
        raise RecordError("text", "missing (a pretraining record is {\"text\": \"...\"})")
    if not isinstance(text, str) or not text.strip():
        raise RecordError("text", "must be a non-empty string")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = ([tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id])[: cfg.max_seq_len]
    return {"input_ids": ids, "labels": list(ids)}


def collate(rows, tokenizer, cfg):
    return pad_collate(rows, tokenizer.pad_token_id, padded_length(cfg))


SPEC = register_stage(StageSpec(
    name="pretrain",
    help="next-token pretraining on raw text",
    config=PretrainConfig,
    encode=encode,
    collate=collate,
    loss=causal_lm_loss,
    loss_units=count_label_tokens,
    fixed_length=True,
    cross_entropy_variants=True,
))
