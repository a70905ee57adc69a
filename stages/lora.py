"""lora: train a peft LoRA adapter on an existing model with SFT conversations; the base stays frozen.

final/ holds only the adapter (adapter_config.json + adapter_model.safetensors + tokenizer), loadable
with `PeftModel.from_pretrained(base, final/)` or `chat --model BASE --adapter final/`; with
`merge_lora` a merged full model is also written to final/merged/.
"""
from pathlib import Path

import torch
from pydantic import Field, field_validator

from minimind_scale import StageSpec, TrainConfig, register_stage
from minimind_scale.config import BatchSize, Epochs, LearningRate, ModelSource, OutDir, Packing
from minimind_scale.data import sft_rows
from minimind_scale.data.sft_rows import AddSystemRatio, EmptyThinkRatio
from minimind_scale.errors import UserError
from minimind_scale.losses.causal_lm import causal_lm_loss, count_label_tokens
from minimind_scale.models.build import PRESETS, save_hf

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraConfig(TrainConfig):
    """MiniMind's LoRA defaults (train_lora.py): rank 8, lr 1e-4, batch 32, 512-token conversations.
    alpha 16 (= 2·rank, a common scale of 2) and no dropout. Epochs 10 rather than MiniMind's 50:
    50 passes suit its 91-line identity set but overfit anything larger (set epochs for tiny sets)."""

    model: ModelSource = Field("out/full_sft/final", description="the model directory to adapt (usually an SFT "
                               "run's final/); not a preset")
    packing: Packing = True
    add_system_ratio: AddSystemRatio = 0.2
    empty_think_ratio: EmptyThinkRatio = 0.2
    lora_rank: int = Field(8, ge=1, description="LoRA rank r")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scale numerator: the update is (alpha / r)·B·A")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_LINEAR),
                                      description="module names that get an adapter (default: every attention and "
                                                  "MLP projection)")
    merge_lora: bool = Field(False, description="also write the base with the adapter merged in to final/merged/")
    learning_rate: LearningRate = 1e-4
    batch_size: BatchSize = 32
    epochs: Epochs = 10
    out_dir: OutDir = "out/lora"

    @field_validator("model")
    @classmethod
    def _needs_a_trained_model(cls, v: str) -> str:
        if v in PRESETS:
            raise ValueError(f"LoRA adapts an existing model: give a model directory (e.g. out/full_sft/final), "
                             f"not the preset '{v}', whose weights would be random")
        return v


def setup(model, cfg, ctx):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                            target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # peft's message for target modules the model does not have
        raise UserError(f"target_modules {cfg.target_modules}: {e}") from None


def finalize(model, tokenizer, final_dir: Path, cfg, ctx):
    if not cfg.merge_lora:
        return
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from minimind_scale.training.distributed import whole_model_construction

    # Merged from the saved adapter and a fresh copy of the base rather than from the live model: the
    # live one may be sharded (ZeRO-3) or wrapped, and merging it in place would change what was trained.
    # Only the main process runs this, so the base must not be built under ZeRO-3's collective zero.Init.
    with whole_model_construction(ctx.accelerator):
        base = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(final_dir)).merge_and_unload()
    save_hf(merged, tokenizer, final_dir / "merged")


SPEC = register_stage(StageSpec(
    name="lora",
    help="train a LoRA adapter (peft) on an SFT model with conversations; base weights frozen",
    config=LoraConfig,
    encode=sft_rows.encode,
    encode_batch=sft_rows.encode_batch,
    collate=sft_rows.collate,
    loss=causal_lm_loss,
    loss_units=count_label_tokens,
    setup=setup,
    finalize=finalize,
    fixed_length=True,
    cross_entropy_variants=True,
    record_positions=True,
    data_fields=sft_rows.AUGMENTATION_FIELDS,
    perplexity_of="loss",
    record_keys=sft_rows.RECORD_KEYS,
    eval_overrides=sft_rows.AUGMENTATIONS_OFF,
))
