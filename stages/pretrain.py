"""pretrain: next-token prediction on raw text ({"text": ...}), loss on every real token."""
from pydantic import Field

from minimind_scale import LossOutput, StageSpec, TrainConfig, register_stage  # noqa: F401
from minimind_scale.data import pad_collate, padded_length
from minimind_scale.errors import RecordError
from minimind_scale.losses import causal_lm_loss, count_label_tokens


class PretrainConfig(TrainConfig):
    """MiniMind's pretraining defaults: lr 5e-4, 8-step accumulation, 512-token rows."""

    model: str = Field("minimind2-small", description="a preset name or a Hugging Face model directory to start from")
    learning_rate: float = Field(5e-4, gt=0, description="peak learning rate")
    batch_size: int = Field(32, ge=1, description="samples per micro-batch per process")
    accumulation_steps: int = Field(8, ge=1, description="micro-batches per optimizer step")
    max_seq_len: int = Field(512, ge=8, description="tokens per sample; longer texts keep their prefix")
    packing: bool = Field(True, description="pack several samples into each max_seq_len row (best-fit decreasing); "
                          "attention never crosses samples, so the loss is that of unpacked rows, with far less padding")
    out_dir: str = Field("out/pretrain", description="where config.yaml, metrics.jsonl, checkpoints/ and final/ go")


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
))
