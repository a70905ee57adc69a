"""reward: a Bradley-Terry reward model on {"chosen": [messages], "rejected": [messages]} pairs.

The model is the starting causal LM's backbone with a new one-output score head
(`AutoModelForSequenceClassification`, num_labels 1), which scores a conversation at its last real
token. A record may carry a numeric `margin` by which its chosen answer should win. The unit of the
loss is the pair: `loss` returns the sum of per-pair losses and every metric as a sum over pairs, so
the engine's per-step normalisation reports means over all pairs of the step. final/ loads with
`AutoModelForSequenceClassification.from_pretrained` and scores with `eval --stage reward`.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator

from minimind_scale import LossOutput, StageSpec, TrainConfig, register_stage
from minimind_scale.config import BatchSize, LearningRate, MaxSeqLen, ModelSource, OutDir
from minimind_scale.data import pair_rows
from minimind_scale.data.batching import forward_kwargs
from minimind_scale.errors import RecordError, UserError
from minimind_scale.losses.reward_model import bradley_terry_loss, pair_metrics
from minimind_scale.models.build import PRESETS


class RewardConfig(TrainConfig):
    """Defaults from TRL's RewardTrainer (RewardConfig) where it has them: 1024-token conversations,
    no reward centering (center_rewards_coefficient 0 = TRL's None; TRL suggests 0.01), a margin only
    where the data gives one, the score read at the last real token. From MiniMind's preference set-up
    (train_dpo.py): 4 pairs per micro-batch, 1 epoch, starting from the SFT model. lr 1e-5 is ours:
    TRL's default is 1e-4, but here every backbone weight trains (no adapter), and a full update of
    an SFT model at 1e-4 is large for a model this size (DPO's default is 1e-6)."""

    model: ModelSource = Field("out/full_sft/final", description="the model directory to start from: a causal LM "
                               "(usually an SFT run's final/; its backbone gets a new score head) or an existing "
                               "reward model; not a preset")
    center_rewards_coefficient: float = Field(0.0, ge=0, description="weight of the (r_chosen + r_rejected)^2 term "
                                              "that pulls scores towards zero mean (TRL's; 0: off)")
    learning_rate: LearningRate = 1e-5
    batch_size: BatchSize = Field(4, description="preference pairs per micro-batch per process (2x rows: chosen + "
                                  "rejected)")
    max_seq_len: MaxSeqLen = 1024
    out_dir: OutDir = "out/reward"

    @field_validator("model")
    @classmethod
    def _needs_a_trained_model(cls, v: str) -> str:
        if v in PRESETS:
            raise ValueError(f"a reward model starts from a trained model: give a model directory (e.g. "
                             f"out/full_sft/final), not the preset '{v}', whose weights would be random")
        return v


def record_margin(record: dict) -> float:
    """The record's `margin` as a float; 0.0 when it has none."""
    value = record.get("margin", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError("margin", f"must be a number, got {type(value).__name__} {value!r:.60}")
    try:
        margin = float(value)
    except OverflowError:  # an integer beyond float range
        margin = math.inf
    if not math.isfinite(margin):
        raise RecordError("margin", f"must be a finite number, got {value!r:.60}")
    return margin


def encode(record: dict, tokenizer, cfg) -> dict:
    out = pair_rows.encode(record, tokenizer, cfg)
    out["margin"] = record_margin(record)
    return out


def encode_batch(records: list[dict], tokenizer, cfg) -> list[dict | RecordError]:
    """`encode` of each record: pair_rows.encode_batch, then each encoded pair's margin."""
    out = []
    for record, pair in zip(records, pair_rows.encode_batch(records, tokenizer, cfg)):
        if not isinstance(pair, RecordError):
            try:
                pair["margin"] = record_margin(record)
            except RecordError as e:
                pair = e
        out.append(pair)
    return out


def collate(rows, tokenizer, cfg):
    """pair_rows.collate's chosen-then-rejected rows, plus the pairs' margins [pairs]."""
    batch = pair_rows.collate(rows, tokenizer, cfg)
    batch["margin"] = torch.tensor([r["margin"] for r in rows], dtype=torch.float32)
    return batch


def build_model(cfg, tokenizer):
    """The backbone of `cfg.model` with a one-output score head (new, unless `cfg.model` is a reward model)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(cfg.model)
    classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    if classifier and config.num_labels != 1:
        raise UserError(f"{cfg.model} is a sequence classifier with num_labels {config.num_labels}: a reward model "
                        "has one output; start from a causal LM or a reward model")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(cfg.model, num_labels=1, dtype=torch.float32)
    except ValueError as e:  # a model type with no sequence-classification class
        raise UserError(f"{cfg.model}: no sequence-classification model for it ({e})") from None
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise UserError(f"{cfg.model}: its vocabulary ({model.get_input_embeddings().num_embeddings}) is smaller than "
                        f"the tokenizer's ({len(tokenizer)})")
    # The score is read at the last token that is not padding, found through pad_token_id.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def pair_scores(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), [pairs] each in fp32, from one forward over chosen and rejected rows."""
    scores = model(**forward_kwargs(batch, model)).logits.squeeze(-1).float()
    return pair_rows.split_pairs(scores)


def loss(model, batch: dict, cfg, ctx) -> LossOutput:
    r_chosen, r_rejected = pair_scores(model, batch)
    losses = bradley_terry_loss(r_chosen, r_rejected, batch["margin"], cfg.center_rewards_coefficient)
    metrics = {name: per_pair.sum() for name, per_pair in pair_metrics(r_chosen, r_rejected).items()}
    return LossOutput(losses.sum(), metrics)


SPEC = register_stage(StageSpec(
    name="reward",
    help="train a Bradley-Terry reward model (a sequence classifier) on chosen/rejected conversation pairs",
    config=RewardConfig,
    encode=encode,
    encode_batch=encode_batch,
    collate=collate,
    loss=loss,
    loss_units=pair_rows.count_pairs,
    build_model=build_model,
    packable=False,
    fixed_length=True,
    value_columns={"margin": "float32"},
    record_keys=pair_rows.RECORD_KEYS,
    eval_metrics=("accuracy", "margin"),
    units_name="pairs",
    model_kind="reward_model",
))
