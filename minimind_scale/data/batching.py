"""A batch: how rows become one (padding, packed-sample boundaries) and how it is fed to the model.

Padded rows carry an `attention_mask`. Packed rows carry `position_ids` that restart at 0 for every
sample and no mask: transformers then builds a block-diagonal causal mask from the restarting positions
(SDPA, eager) when the forward runs without a cache. Varlen kernels (flash attention) ignore masks and
position ids, so packed batches also carry their sample boundaries (`cu_seq_lens_*`, `max_length_*`).
docs/architecture.md explains why the loss of packed rows equals that of the samples alone.

What the engine counts in a causal-LM batch (`token_counts`, a StageSpec's default) is defined here too,
next to the padding it must see through.
"""
from __future__ import annotations

from typing import Any

import torch

from minimind_scale.data.rows import IGNORE_INDEX

# Sample boundaries of packed rows, for varlen attention kernels.
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# Kernels that keep packed samples apart with the mask transformers derives from position ids.
MASK_BASED_ATTENTION = ("sdpa", "eager", "flex_attention")
# A packed batch's count of real tokens (bookkeeping, not a model input). A padded batch is counted by its
# attention_mask; a packed one has none, and its position ids cannot tell padding from a one-token sample.
REAL_TOKENS = "real_tokens"


def pad_collate(rows: list[dict[str, Any]], pad_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row of the batch (or to `length`): input_ids with pad_id, labels with IGNORE_INDEX.

    Packed rows (with position_ids) get position_ids padded with 0 and no attention_mask; each padding
    token then counts as a sample of its own, so it is never attended to. Their batch also carries its
    sample boundaries (VARLEN_KEYS) and its count of real tokens (REAL_TOKENS).
    """
    longest = max([len(r["input_ids"]) for r in rows] + [length or 0])
    packed = "position_ids" in rows[0]
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    extra = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"])
        labels[i, :n] = torch.as_tensor(r["labels"])
        extra[i, :n] = torch.as_tensor(r["position_ids"]) if packed else 1
    batch = {"input_ids": ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}
    if packed:
        lengths = [len(r["input_ids"]) for r in rows]
        batch[REAL_TOKENS] = torch.tensor(sum(lengths))
        batch.update(varlen_boundaries(extra, lengths))
    return batch


def count_label_tokens(batch: dict) -> torch.Tensor:
    """Loss-bearing tokens: positions whose next token has a label (the first label predicts nothing)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def token_counts(batch: dict) -> tuple[torch.Tensor | int, torch.Tensor | int]:
    """(loss-bearing tokens, real input tokens) of a causal-LM batch: `labels` with IGNORE_INDEX, and an
    `attention_mask` or, packed, REAL_TOKENS. What a batch lacks counts 0. The default of a StageSpec's
    `token_counts`: the engine reports the first as `tokens` and bases throughput and MFU on the second."""
    labels = count_label_tokens(batch) if "labels" in batch else 0
    if "attention_mask" in batch:
        return labels, batch["attention_mask"].sum()
    return labels, batch.get(REAL_TOKENS, 0)


def padded_length(cfg) -> int | None:
    """The fixed row length of `pad_to max_seq_len` (MiniMind's batches), else None: the batch's longest.
    Packed rows under `compile` are padded to max_seq_len too: they are nearly full anyway, and one
    shape for every step means the graph compiles once. A stage whose collate pads to this length
    declares `fixed_length` on its StageSpec."""
    if cfg.pad_to == "max_seq_len" or (cfg.compile and cfg.packing):
        return cfg.max_seq_len
    return None


def varlen_boundaries(position_ids: torch.Tensor, lengths: list[int]) -> dict:
    """Flash-attention varlen keyword arguments for a right-padded batch of packed rows.

    `position_ids` [rows, width] restart at 0 at every sample; `lengths` are the rows' real lengths.
    The batch is seen flattened to rows·width tokens: a sample starts at every row's start and wherever
    a later real position is 0, and each row's padding tail is one segment of its own (nothing real
    attends to it, and it bears no loss).
    """
    rows, width = position_ids.shape
    starts = []
    for r, n in enumerate(lengths):
        later = (position_ids[r, 1:n] == 0).nonzero().flatten() + 1
        starts.extend([r * width] + (later + r * width).tolist())
        if 0 < n < width:
            starts.append(r * width + n)
    cu = torch.tensor(starts + [rows * width], dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max()) if len(cu) > 1 else 0
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def to_device(batch: dict, device) -> dict:
    """The batch's tensors moved to `device`; other values (the varlen maximum lengths) as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def forward_kwargs(batch: dict, model=None) -> dict:
    """The model inputs of a batch; `use_cache=False` also keeps packed samples from attending to each other.
    A packed batch's sample boundaries go to every attention kernel that is not mask-based."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
        config = unwrap_config(model) if model is not None else None
        if getattr(config, "_attn_implementation", None) not in MASK_BASED_ATTENTION:
            kwargs.update({k: batch[k] for k in VARLEN_KEYS if k in batch})
    return kwargs


def unwrap_config(model):
    """The Hugging Face config of a model inside any wrappers (DDP, DeepSpeed, compile)."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return getattr(model, "config", None)
