"""The optimizer and learning-rate schedule every stage trains with."""
from __future__ import annotations

import torch

from .distributed import load_deepspeed_config
from .errors import UserError


def build_optimizer(model, cfg):
    """AdamW; weight decay only on matrices (norm gains and biases are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
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
