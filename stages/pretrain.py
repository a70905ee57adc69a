"""pretrain: next-token prediction on raw text ({"text": ...}), loss on every real token."""
from minimind_scale import StageSpec, TrainConfig, register_stage
from minimind_scale.config import AccumulationSteps, BatchSize, OutDir, Packing
from minimind_scale.data.batching import pad_collate, padded_length
from minimind_scale.errors import RecordError
from minimind_scale.losses.causal_lm import causal_lm_loss, count_label_tokens


class PretrainConfig(TrainConfig):
    """MiniMind's pretraining defaults: lr 5e-4, 8-step accumulation, 512-token rows."""

    batch_size: BatchSize = 32
    accumulation_steps: AccumulationSteps = 8
    packing: Packing = True
    out_dir: OutDir = "out/pretrain"


def record_text(record: dict) -> str:
    text = record.get("text")
    if text is None:
        raise RecordError("text", "missing (a pretraining record is {\"text\": \"...\"})")
    if not isinstance(text, str) or not text.strip():
        raise RecordError("text", "must be a non-empty string")
    return text


def _row(ids: list[int], bos: int, eos: int, max_seq_len: int) -> dict:
    ids = ([bos] + ids + [eos])[:max_seq_len]
    return {"input_ids": ids, "labels": list(ids)}


def encode(record: dict, tokenizer, cfg) -> dict:
    text = record_text(record)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return _row(ids, tokenizer.bos_token_id, tokenizer.eos_token_id, cfg.max_seq_len)


def encode_batch(records: list[dict], tokenizer, cfg) -> list[dict | RecordError]:
    """`encode` of each record, the valid texts tokenised in one call."""
    out: list = [None] * len(records)
    texts, where = [], []
    for i, record in enumerate(records):
        try:
            texts.append(record_text(record))
            where.append(i)
        except RecordError as e:
            out[i] = e
    if texts:
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        batch = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)
        for i, ids in zip(where, batch["input_ids"]):
            out[i] = _row(ids, bos, eos, cfg.max_seq_len)
    return out


def collate(rows, tokenizer, cfg):
    return pad_collate(rows, tokenizer.pad_token_id, padded_length(cfg))


SPEC = register_stage(StageSpec(
    name="pretrain",
    help="next-token pretraining on raw text",
    config=PretrainConfig,
    encode=encode,
    encode_batch=encode_batch,
    collate=collate,
    loss=causal_lm_loss,
    loss_units=count_label_tokens,
    fixed_length=True,
    cross_entropy_variants=True,
    record_keys=("text",),
))
