"""Model FLOPs per token and the device's peak, for the `mfu` metric (model FLOPs utilisation).

Counted as in the PaLM paper's appendix: every matmul weight W costs 2·|W| FLOPs per token forward
and 4·|W| backward (activation and weight gradients), and attention's score and value products add
12 · layers · row length · query width per token for forward and backward (no saving for the
causal mask). Only the trained model counts: not a DPO reference or a distillation teacher.
"""
from __future__ import annotations

import torch

# Dense peak TFLOP/s per GPU by (name fragment, precision), from the vendors' data sheets (SXM parts;
# fp32 means TF32 tensor cores, which PyTorch uses for fp32 matmuls only when allowed).
PEAK_TFLOPS = {
    ("H200", "bf16"): 989.0, ("H200", "fp16"): 989.0, ("H200", "fp32"): 494.5,
    ("H100", "bf16"): 989.0, ("H100", "fp16"): 989.0, ("H100", "fp32"): 494.5,
    ("A100", "bf16"): 312.0, ("A100", "fp16"): 312.0, ("A100", "fp32"): 156.0,
    ("L40S", "bf16"): 362.0, ("L40S", "fp16"): 362.0,
    ("A10G", "bf16"): 70.0, ("A10G", "fp16"): 70.0,
    ("RTX 4090", "bf16"): 165.2, ("RTX 4090", "fp16"): 165.2,
    ("V100", "fp16"): 125.0,
}


def matmul_params_per_token(config) -> int:
    """Weights a token is multiplied by: attention and MLP projections (the routed experts only, for
    an MoE model), the router, and the output head. The input embedding is a lookup, not a matmul."""
    h = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q_width = config.num_attention_heads * head_dim
    kv_width = config.num_key_value_heads * head_dim
    attention = h * q_width * 2 + h * kv_width * 2
    experts = getattr(config, "num_experts", 0) or 0
    if experts:
        mlp = config.num_experts_per_tok * 3 * h * config.moe_intermediate_size + h * experts
    else:
        mlp = 3 * h * config.intermediate_size
    return config.num_hidden_layers * (attention + mlp) + h * config.vocab_size


def train_flops_per_token(config, row_length: int, trainable_fraction: float = 1.0) -> float:
    """Forward + backward FLOPs per token. Frozen weights (LoRA's base) need no weight gradient, so
    only `trainable_fraction` of the weights pay the last 2·|W|."""
    params = matmul_params_per_token(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 12 * config.num_hidden_layers * row_length * config.num_attention_heads * head_dim
    return (4 + 2 * trainable_fraction) * params + attention


def device_peak_flops(precision: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device for `precision` (bf16, fp16, fp32): the override, else the table's
    entry for this GPU; None when unknown (CPUs, unlisted GPUs)."""
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for (fragment, prec), tflops in PEAK_TFLOPS.items():
        if fragment in name and prec == precision:
            return tflops * 1e12
    return None
