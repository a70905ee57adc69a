"""Which attention kernel a run uses.

Packed rows must never attend across samples. Two mechanisms keep them apart, one per kind of kernel:
- mask-based kernels (sdpa, eager): transformers builds a block-diagonal causal mask from position ids
  that restart at 0, when the forward has no attention mask and no cache;
- varlen kernels (flash attention): they take no mask. transformers infers sample boundaries from
  position ids only for a batch of ONE row; with several rows it silently runs plain causal attention
  over the whole row. So the collator hands every packed batch its boundaries explicitly
  (`batching.varlen_boundaries`), as the cumulative sequence lengths of the flattened batch, which is what
  transformers passes to flash-attn's varlen functions. Mask-based kernels ignore them.
"""
from __future__ import annotations

import importlib.util

import torch

from minimind_scale.errors import UserError

# The kernel each flash variant needs, as (import name, pip name).
_FLASH_PACKAGES = {"flash_attention_2": ("flash_attn", "flash-attn"),
                   "flash_attention_3": ("flash_attn_interface", "flash-attn-3 (flash_attn_interface)")}


def resolve_attention(requested: str, precision: str, on_cuda: bool | None = None) -> str:
    """The attention implementation to run: `requested`, or for `auto` flash-attention 2 on CUDA in
    bf16/fp16 where flash-attn is installed, else SDPA. An explicit flash request that cannot run is
    the user's mistake (exit 2), never a silent fallback."""
    on_cuda = torch.cuda.is_available() if on_cuda is None else on_cuda
    half = precision in ("bf16", "fp16")
    if requested == "auto":
        usable = on_cuda and half and importlib.util.find_spec("flash_attn") is not None
        return "flash_attention_2" if usable else "sdpa"
    if requested in _FLASH_PACKAGES:
        module, package = _FLASH_PACKAGES[requested]
        if not on_cuda:
            raise UserError(f"attn_implementation {requested} needs a CUDA GPU; use sdpa (or auto)")
        if not half:
            raise UserError(f"attn_implementation {requested} runs in bf16 or fp16, and this run is {precision}; "
                            "set --dtype bf16, or use sdpa")
        if importlib.util.find_spec(module) is None:
            raise UserError(f"attn_implementation {requested}: {package} is not installed; install it or use sdpa")
    return requested
