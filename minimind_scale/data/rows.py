"""Constants and helpers about tokenised rows that every layer shares. A leaf: it imports nothing from the package.

A row is one tokenised sample (or, packed, several): `input_ids`, `labels` aligned with them, and for packed
rows `position_ids` that restart at 0 where each sample begins.
"""
from __future__ import annotations

import datasets
import numpy as np
import pyarrow.compute as pc

# The label of a position that bears no loss (prompt, padding, a packed sample's first token).
IGNORE_INDEX = -100
# A well-formed sample whose loss-bearing part lies beyond max_seq_len: it would train nothing, so it
# is dropped and counted, not treated as malformed. Encoders word their RecordError with it.
NO_LOSS = "no loss-bearing token"


def row_lengths(dataset: datasets.Dataset) -> np.ndarray:
    """Tokens per row (the longest of its *input_ids columns: a DPO row pads to its longer side), read
    from the Arrow list offsets without decoding a token."""
    table = dataset.with_format("arrow")[:]
    columns = [c for c in table.column_names if c.endswith("input_ids")]
    return np.max([pc.list_value_length(table[c]).to_numpy(zero_copy_only=False) for c in columns], axis=0)
