"""pretrain: next-token prediction on raw text ({"text": ...}), loss on every real token."""
from minimind_scale import StageSpec, TrainConfig, register_stage
from minimind_scale.config import AccumulationSteps, BatchSize, OutDir, Packing
from minimind_scale.data.batching import pad_collate, padded_length
from minimind_scale.data.text_rows import TEXT_KEY, encode_text, encode_texts, record_text
from minimind_scale.errors import RecordError
from minimind_scale.losses.causal_lm import causal_lm_loss, count_label_tokens


class PretrainConfig(TrainConfig):
    """MiniMind's pretraining defaults: lr 5e-4, 8-step accumulation, 512-token rows."""

    batch_size: BatchSize = 32
    accumulation_steps: AccumulationSteps = 8
    packing: Packing = True
    out_dir: OutDir = "out/pretrain"


def encode(record: dict, tokenizer, cfg) -> dict:
    """One pretraining record as a row, a label on every token (data/text_rows.py)."""
    return encode_text(record_text(record), tokenizer, cfg.max_seq_len)


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
    for i, row in zip(where, encode_texts(texts, tokenizer, cfg.max_seq_len)):
        out[i] = row
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
    perplexity_of="loss",
    record_keys=(TEXT_KEY,),
))
