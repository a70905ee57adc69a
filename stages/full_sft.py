"""full_sft (alias sft): supervised fine-tuning on chat conversations, loss on assistant tokens only."""
from pydantic import Field

from minimind_scale import StageSpec, TrainConfig, register_stage
from minimind_scale.conversation import encode_chat, normalize_messages
from minimind_scale.data import pad_collate, padded_length
from minimind_scale.losses import causal_lm_loss, count_label_tokens


class FullSFTConfig(TrainConfig):
    """Defaults for fine-tuning a pretrained model: lr 1e-5 (MiniMind goes lower, 1e-6, on its large
    SFT mixes; 1e-5 moves a small model visibly on small data), 768-token conversations, 2 epochs."""

    model: str = Field("out/pretrain/final", description="a Hugging Face model directory (usually a pretrain run's final/) or a preset name")
    learning_rate: float = Field(1e-5, gt=0, description="peak learning rate")
    batch_size: int = Field(16, ge=1, description="conversations per micro-batch per process")
    max_seq_len: int = Field(768, ge=8, description="tokens per conversation; longer ones keep their prefix")
    epochs: int = Field(2, ge=1, description="passes over the data (ignored when max_steps is set)")
    packing: bool = Field(True, description="pack several samples into each max_seq_len row (best-fit decreasing); "
                          "attention never crosses samples, so the loss is that of unpacked rows, with far less padding")
    out_dir: str = Field("out/full_sft", description="where config.yaml, metrics.jsonl, checkpoints/ and final/ go")


def encode(record: dict, tokenizer, cfg) -> dict:
    messages, tools = normalize_messages(record)
    return encode_chat(messages, tools, tokenizer, cfg.max_seq_len)


def collate(rows, tokenizer, cfg):
    return pad_collate(rows, tokenizer.pad_token_id, padded_length(cfg))


SPEC = register_stage(StageSpec(
    name="full_sft",
    aliases=("sft",),
    help="supervised fine-tuning on conversations (loss on assistant turns)",
    config=FullSFTConfig,
    encode=encode,
    collate=collate,
    loss=causal_lm_loss,
    loss_units=count_label_tokens,
))
