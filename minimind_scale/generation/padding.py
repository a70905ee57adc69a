"""Left padding of token-id prompts, the one implementation: every prompt then ends in the last column,
where generation starts. Prompt batches (rl.prompts.collate), trajectories and backends all use it."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both [rows, longest] long: each sequence right-aligned after `pad_id` padding."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """The real tokens of each row of a padded batch (the inverse of `left_pad`)."""
    return [row[keep].tolist() for row, keep in zip(input_ids.cpu(), attention_mask.bool().cpu())]
