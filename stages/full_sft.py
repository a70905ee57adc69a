"""full_sft (alias sft): supervised fine-tuning on chat conversations, loss on assistant tokens only."""
from pydantic import Field

from minimind_scale import StageSpec, TrainConfig, register_stage
from minimind_scale.batching import pad_collate, padded_length
from minimind_scale.config import BatchSize, Epochs, LearningRate, MaxSeqLen, ModelSource, OutDir, Packing
from minimind_scale.conversation import encode_chat, encode_chats, normalize_messages
from minimind_scale.errors import RecordError
from minimind_scale.losses import causal_lm_loss, count_label_tokens


class FullSFTConfig(TrainConfig):
    """Defaults for fine-tuning a pretrained model: lr 1e-5 (MiniMind goes lower, 1e-6, on its large
    SFT mixes; 1e-5 moves a small model visibly on small data), 768-token conversations, 2 epochs."""

    model: ModelSource = Field("out/pretrain/final", description="a Hugging Face model directory (usually a "
                               "pretrain run's final/) or a preset name")
    learning_rate: LearningRate = 1e-5
    batch_size: BatchSize = 16
    max_seq_len: MaxSeqLen = 768
    epochs: Epochs = 2
    packing: Packing = True
    out_dir: OutDir = "out/full_sft"


def encode(record: dict, tokenizer, cfg) -> dict:
    messages, tools = normalize_messages(record)
    return encode_chat(messages, tools, tokenizer, cfg.max_seq_len)


def encode_batch(records: list[dict], tokenizer, cfg) -> list[dict | RecordError]:
    """`encode` of each record: the valid conversations rendered one by one, then tokenised in one call."""
    out: list = [None] * len(records)
    conversations, where = [], []
    for i, record in enumerate(records):
        try:
            conversations.append(normalize_messages(record))
            where.append(i)
        except RecordError as e:
            out[i] = e
    for i, encoded in zip(where, encode_chats(conversations, tokenizer, cfg.max_seq_len)):
        out[i] = encoded
    return out


def collate(rows, tokenizer, cfg):
    return pad_collate(rows, tokenizer.pad_token_id, padded_length(cfg))


SPEC = register_stage(StageSpec(
    name="full_sft",
    aliases=("sft",),
    help="supervised fine-tuning on conversations (loss on assistant turns)",
    config=FullSFTConfig,
    encode=encode,
    encode_batch=encode_batch,
    collate=collate,
    loss=causal_lm_loss,
    loss_units=count_label_tokens,
    fixed_length=True,
    cross_entropy_variants=True,
))
