"""The optimizer and learning-rate schedule every stage trains with."""
from __future__ import annotations

import torch

from minimind_scale.errors import UserError
from minimind_scale.training.distributed import load_deepspeed_config


def parameter_groups(model, cfg, rates: dict[str, float] | None = None) -> list[dict]:
    """Weight decay only on matrices (norm gains and biases are not decayed); parameters whose name starts
    with a prefix in `rates` get that peak learning rate. Groups at --learning_rate come first, so the
    rate a log reports (the first group's) is the policy's."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise UserError("the model has no trainable parameters")
    rates = rates or {}

    def rate(name: str) -> float:
        return next((lr for prefix, lr in rates.items() if name.startswith(prefix)), cfg.learning_rate)

    groups: dict[tuple[float, bool], list] = {}
    for name, p in named:
        groups.setdefault((rate(name), p.ndim >= 2), []).append(p)
    ordered = sorted(groups, key=lambda key: (key[0] != cfg.learning_rate, not key[1]))
    return [{"params": groups[key], "lr": key[0], "weight_decay": cfg.weight_decay if key[1] else 0.0}
            for key in ordered]


def build_optimizer(model, cfg, rates: dict[str, float] | None = None):
    """AdamW over parameter_groups."""
    groups = parameter_groups(model, cfg, rates)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.deepspeed and "offload_optimizer" in load_deepspeed_config(cfg.deepspeed).get("zero_optimization", {}):
        # ZeRO's optimizer offload steps on the CPU and accepts only DeepSpeed's CPU Adam (AdamW mode).
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.learning_rate, betas=betas, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas)


def build_scheduler(optimizer, cfg, total_steps: int):
    """Linear warm-up, then cosine decay to min_lr_ratio of the peak."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=cfg.warmup_steps,
                                                       num_training_steps=total_steps, min_lr_rate=cfg.min_lr_ratio)
