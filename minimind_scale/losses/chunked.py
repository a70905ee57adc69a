"""The next-token loss without the [tokens x vocab] logits: cross_entropy chunked or liger.

Why a forward variant bound on the model rather than a loss that reaches into it: under Accelerate the
model is wrapped (DDP, a DeepSpeed engine) and the wrapper's hooks (gradient sync, ZeRO-3 gathering of
sharded weights) run only when the forward goes through the wrapper's __call__. So
`enable_loss_forward` gives the Hugging Face causal LM (inside peft, if any) a forward that, called with
`loss_sum_only=True`, returns the summed loss and no logits; any other call runs the original forward.
It must be bound before `accelerator.prepare`, whose mixed-precision autocast wraps the forward it finds.
"""
from __future__ import annotations

import math
import sys
import types

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from minimind_scale.data.rows import IGNORE_INDEX
from minimind_scale.errors import UserError
from minimind_scale.losses.causal_lm import shifted_labels

# Positions per chunk: its fp32 logits take 26 MB at MiniMind's 6400-token vocabulary (620 MB at Qwen's
# 151k), while a 1024-row matmul still runs at full speed.
CHUNK_TOKENS = 1024
MODES = ("chunked", "liger")


def enable_loss_forward(model: torch.nn.Module, mode: str, chunk_tokens: int = CHUNK_TOKENS) -> None:
    """Bind the loss-only forward variant on the causal LM in `model` (a peft model or a plain one)."""
    if mode not in MODES:
        raise ValueError(f"cross_entropy {mode!r}: expected one of {MODES}")
    if mode == "liger":
        require_liger()
    lm = causal_lm(model)
    # Re-enabling replaces the variant instead of stacking a second wrapper on the first.
    original = getattr(lm.forward, "logits_forward", lm.forward)

    def forward(self, *args, loss_sum_only: bool = False, max_tokens: int | None = None, **kwargs):
        if not loss_sum_only:
            return original(*args, **kwargs)
        if args:
            raise TypeError("the loss-only forward takes keyword arguments only")
        return loss_sum_forward(self, mode, chunk_tokens, max_tokens, **kwargs)

    forward.logits_forward = original
    lm.forward = types.MethodType(forward, lm)


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face causal LM itself: peft's LoRA layers live inside it, so its forward sees them."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(lm, "get_output_embeddings", lambda: None)() is None or not hasattr(lm, lm.base_model_prefix):
        raise UserError(f"cross_entropy chunked/liger needs a causal LM with an output layer, not {type(lm).__name__}")
    return lm


def require_liger() -> None:
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        raise UserError("cross_entropy liger: liger-kernel is not installed; install liger-kernel or use "
                        "cross_entropy chunked") from None


def loss_sum_forward(lm, mode: str, chunk_tokens: int, max_tokens: int | None, labels: torch.Tensor,
                     **kwargs) -> MoeCausalLMOutputWithPast:
    """Hidden states from the base model, then the summed loss; the output has the fields causal_lm_loss
    reads from a full forward (`loss` here is the fp32 sum, `logits` stays None)."""
    # peft passes output_attentions=None and the like explicitly; the base model wants them absent.
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    out = getattr(lm, lm.base_model_prefix)(**kwargs)
    hidden = out.last_hidden_state
    if mode == "liger":
        loss = liger_cross_entropy_sum(lm.get_output_embeddings(), hidden, labels)
    else:
        loss = chunked_cross_entropy_sum(lm.get_output_embeddings(), hidden, labels, chunk_tokens, max_tokens)
    return MoeCausalLMOutputWithPast(loss=loss, aux_loss=router_aux_loss(lm, out, kwargs.get("attention_mask")))


def router_aux_loss(lm, out, attention_mask) -> torch.Tensor | None:
    """An MoE model's load-balancing loss, computed as its own forward does (None for a dense model)."""
    router_logits = getattr(out, "router_logits", None)
    if not router_logits:
        return None
    # Each transformers MoE family defines load_balancing_loss_func in its modeling module.
    balance = getattr(sys.modules[type(lm).__module__], "load_balancing_loss_func", None)
    if balance is None:
        raise UserError(f"cross_entropy chunked/liger: no router loss known for {type(lm).__name__}; "
                        "use cross_entropy full")
    return balance(router_logits, lm.num_experts, lm.num_experts_per_tok, attention_mask)


def chunked_cross_entropy_sum(lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                              chunk_tokens: int = CHUNK_TOKENS, max_tokens: int | None = None) -> torch.Tensor:
    """Σ next-token cross-entropy in fp32, the output layer applied to `chunk_tokens` positions at a time.

    Each chunk is checkpointed, so its logits are freed after forward and recomputed in backward. Every
    call makes the same number of chunks for the same `max_tokens` (a bound on any micro-batch's
    positions; empty chunks pad the loop): under ZeRO-3 each lm_head call gathers its weight in a
    collective, and ranks with different batch lengths must still issue the same collectives.
    """
    target = shifted_labels(labels).reshape(-1)
    keep = target != IGNORE_INDEX
    # Only loss-bearing positions need logits; a conversation's prompt needs none.
    hidden, target = hidden.reshape(-1, hidden.size(-1))[keep], target[keep]
    chunks = max(1, math.ceil(target.numel() / chunk_tokens), math.ceil((max_tokens or 0) / chunk_tokens))
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, chunks * chunk_tokens, chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        total = total + checkpoint(chunk_cross_entropy_sum, lm_head, hidden[piece], target[piece], use_reentrant=False)
    return total


def chunk_cross_entropy_sum(lm_head: torch.nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Called as a module (not F.linear on its weight) so ZeRO-3 and peft hooks on lm_head still run.
    return F.cross_entropy(lm_head(hidden).float(), target, reduction="sum")


def liger_cross_entropy_sum(lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """liger-kernel's fused matmul + cross-entropy (GPU, triton), which reads lm_head's weight directly."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    # The kernel bypasses the module call, so a LoRA-wrapped head or a ZeRO-3 shard (an empty local
    # weight) would be silently wrong: refuse them.
    if not isinstance(lm_head, torch.nn.Linear) or lm_head.weight.numel() == 0:
        raise UserError("cross_entropy liger needs a plain, unsharded lm_head (not ZeRO-3, not a LoRA target); "
                        "use cross_entropy chunked")
    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    target = shifted_labels(labels).reshape(-1)
    loss = fused(lm_head.weight, hidden.reshape(-1, hidden.size(-1)), target, lm_head.bias)
    return (loss[0] if isinstance(loss, tuple) else loss).float()
