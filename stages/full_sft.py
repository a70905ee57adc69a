"""full_sft (alias sft): supervised fine-tuning on chat conversations, loss on assistant tokens only.

Rows come from data/sft_rows.py, shared with lora and distill: MiniMind's two SFT augmentations (a drawn
system prompt for a share of the records without one, the empty think block removed from most replies
without reasoning) apply as conversations are tokenised, decided per record from --seed and the record's
file and line, so every prepare of the same data gives the same rows.
"""
from pydantic import Field

from minimind_scale import StageSpec, TrainConfig, register_stage
from minimind_scale.config import BatchSize, Epochs, LearningRate, MaxSeqLen, ModelSource, OutDir, Packing
from minimind_scale.data import sft_rows
from minimind_scale.data.sft_rows import AddSystemRatio, EmptyThinkRatio
from minimind_scale.losses.causal_lm import causal_lm_loss, count_label_tokens


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
    add_system_ratio: AddSystemRatio = 0.2
    empty_think_ratio: EmptyThinkRatio = 0.2
    out_dir: OutDir = "out/full_sft"


SPEC = register_stage(StageSpec(
    name="full_sft",
    aliases=("sft",),
    help="supervised fine-tuning on conversations (loss on assistant turns)",
    config=FullSFTConfig,
    encode=sft_rows.encode,
    encode_batch=sft_rows.encode_batch,
    collate=sft_rows.collate,
    loss=causal_lm_loss,
    loss_units=count_label_tokens,
    fixed_length=True,
    cross_entropy_variants=True,
    record_positions=True,
    data_fields=sft_rows.AUGMENTATION_FIELDS,
    perplexity_of="loss",
    record_keys=sft_rows.RECORD_KEYS,
    eval_overrides=sft_rows.AUGMENTATIONS_OFF,
))
