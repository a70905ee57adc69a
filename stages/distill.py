"""distill: train a student on SFT conversations against a teacher's soft targets.

loss = alpha·CE(labels) + (1 - alpha)·T²·KL(teacher_T ‖ student_T), over assistant tokens only.
Reasoning distillation is the same stage on conversations with `reasoning_content` (rendered as a
`<think>` block and labelled like the answer); `delimiter_weight` optionally up-weights the CE of
the `<think>` / `</think>` tokens and of the first answer token, as MiniMind's reasoning stage did.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field, field_validator, model_validator

from minimind_scale import LossOutput, StageSpec, StageState, TrainConfig, register_stage
from minimind_scale.chat.markup import THINK_CLOSE, THINK_OPEN
from minimind_scale.config import BatchSize, LearningRate, ModelSource, OutDir, Packing
from minimind_scale.data import sft_rows
from minimind_scale.data.rows import IGNORE_INDEX
from minimind_scale.data.sft_rows import AddSystemRatio, EmptyThinkRatio
from minimind_scale.errors import UserError
from minimind_scale.losses.causal_lm import count_label_tokens, forward_logits
from minimind_scale.losses.distillation import distillation_loss
from minimind_scale.models.build import is_model_dir
from minimind_scale.models.model_dir import check_model_dir


class DistillConfig(TrainConfig):
    """MiniMind's distillation defaults: alpha 0.5, temperature 1.5. lr 1e-5 as for full_sft (the
    student is usually an SFT model already; raise it for a student from a preset), 512-token rows.
    A student started from a preset uses the teacher's tokenizer unless `tokenizer` is given."""

    teacher: str | None = Field(None, validate_default=True, description="(required) the teacher model directory; "
                                "must share the student's vocabulary")
    model: ModelSource = Field("minimind2-small",
                               description="the student: a preset (from scratch) or a model directory")
    packing: Packing = True
    add_system_ratio: AddSystemRatio = 0.2
    empty_think_ratio: EmptyThinkRatio = 0.2
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the hard-label CE; 1 - alpha goes to the KL term")
    temperature: float = Field(1.5, gt=0,
                               description="softmax temperature T of both models in the KL term (scaled by T²)")
    delimiter_weight: float = Field(1.0, gt=0, description=f"CE weight of {THINK_OPEN}, {THINK_CLOSE} and the first "
                                    "answer token (reasoning distillation; 1 = off)")
    learning_rate: LearningRate = 1e-5
    batch_size: BatchSize = 16
    out_dir: OutDir = "out/distill"

    @field_validator("teacher")
    @classmethod
    def _teacher_is_a_model(cls, v: str | None) -> str:
        if v is None:
            raise ValueError("required: give --teacher DIR (a Hugging Face model directory)")
        if not is_model_dir(v):
            raise ValueError(f"{v} is not a Hugging Face model directory (no config.json)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _teacher_tokenizer_for_a_new_student(cls, data):
        # A student from a preset has no tokenizer of its own; the shipped default would give it a
        # different vocabulary from the teacher's, which KD cannot bridge.
        if isinstance(data, dict) and data.get("tokenizer") is None and isinstance(data.get("teacher"), str):
            model = data.get("model", cls.model_fields["model"].default)
            if not is_model_dir(str(model)) and (Path(data["teacher"]) / "tokenizer_config.json").is_file():
                data = {**data, "tokenizer": data["teacher"]}
        return data


@dataclass
class DistillState(StageState):
    teacher: torch.nn.Module | None = None   # frozen, a full replica on every rank
    delimiters: tuple = (None, None, frozenset())  # see delimiter_ids


def check_same_vocabulary(student, teacher, teacher_dir: str, tokenizer) -> None:
    vs, vt = student.config.vocab_size, teacher.config.vocab_size
    if vs != vt:
        raise UserError(f"the teacher {teacher_dir} has a vocabulary of {vt} tokens and the student has {vs}: "
                        "distillation compares their distributions token by token, so they must share one tokenizer")
    if (Path(teacher_dir) / "tokenizer_config.json").is_file():
        from minimind_scale.models.build import load_tokenizer

        if load_tokenizer(teacher_dir).get_vocab() != tokenizer.get_vocab():
            raise UserError(f"the teacher {teacher_dir} and the student both have {vs} tokens but different "
                            "tokenizers: distillation needs the same tokenizer")


def check_teacher(cfg) -> None:
    """The teacher's config and weights are whole, before any tokenising (the option's validator only
    looks for config.json, so that configs can be built without a real teacher)."""
    check_model_dir(cfg.teacher, "--teacher")


def setup(model, cfg, ctx):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher, dtype=torch.float32)
    check_same_vocabulary(model, teacher, cfg.teacher, ctx.tokenizer)
    # A full replica on every rank (never prepared), also under ZeRO-3: fine at MiniMind's sizes.
    ctx.state.teacher = teacher.eval().requires_grad_(False).to(ctx.accelerator.device)
    ctx.state.delimiters = delimiter_ids(ctx.tokenizer)
    return model


def delimiter_ids(tokenizer) -> tuple[int | None, int | None, set[int]]:
    """(<think> id, </think> id, ids of whitespace-only tokens), None where a tag is not one token."""
    def single(text):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 else None

    blank = {i for t in ("\n", "\n\n", " ") for i in tokenizer(t, add_special_tokens=False)["input_ids"]
             if not tokenizer.decode([i]).strip()}
    return single(THINK_OPEN), single(THINK_CLOSE), blank


def delimiter_weights(input_ids: torch.Tensor, labels: torch.Tensor, delimiters, weight: float) -> torch.Tensor:
    """Per-token weights aligned with labels: `weight` on loss-bearing <think>, </think> and the first
    non-blank token after </think> (where the answer starts), 1 elsewhere."""
    open_id, close_id, blank = delimiters
    w = torch.ones(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    for tag in (open_id, close_id):
        if tag is not None:
            w[input_ids == tag] = weight
    if close_id is not None:
        for row, pos in (input_ids == close_id).nonzero().tolist():
            pos += 1
            while pos < input_ids.shape[1] and int(input_ids[row, pos]) in blank:
                pos += 1
            if pos < input_ids.shape[1]:
                w[row, pos] = weight
    return torch.where(labels != IGNORE_INDEX, w, torch.ones_like(w))


def loss(model, batch: dict, cfg, ctx) -> LossOutput:
    student = forward_logits(model, batch).logits
    with torch.no_grad(), ctx.accelerator.autocast():
        teacher = forward_logits(ctx.state.teacher, batch).logits
    weights = None
    if cfg.delimiter_weight != 1.0:
        weights = delimiter_weights(batch["input_ids"], batch["labels"], ctx.state.delimiters, cfg.delimiter_weight)
    total, ce, kd = distillation_loss(student, teacher, batch["labels"], cfg.alpha, cfg.temperature, weights)
    return LossOutput(total, {"ce_loss": ce.detach(), "kd_loss": kd.detach()})


SPEC = register_stage(StageSpec(
    name="distill",
    help="knowledge distillation from a teacher model on conversations (also reasoning distillation)",
    config=DistillConfig,
    encode=sft_rows.encode,
    encode_batch=sft_rows.encode_batch,
    collate=sft_rows.collate,
    loss=loss,
    loss_units=count_label_tokens,
    check=check_teacher,
    setup=setup,
    state=DistillState,
    fixed_length=True,
    record_positions=True,
    data_fields=sft_rows.AUGMENTATION_FIELDS,
    perplexity_of="ce_loss",
    record_keys=sft_rows.RECORD_KEYS,
    eval_overrides=sft_rows.AUGMENTATIONS_OFF,
))
