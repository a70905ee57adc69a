"""Per-record random choices that every prepare makes alike: drawn from the seed and the record's position.

Data is tokenised once and cached, so a random augmentation (a system prompt added to some records) is
decided when the record is encoded, not when it is sampled. Drawing from a hash of (seed, purpose, file,
line) rather than from a generator makes the choice independent of the number of workers, of how records
are batched and of the order workers finish in: two prepares of the same files give identical rows.
"""
from __future__ import annotations

import hashlib
from typing import NamedTuple


class RecordPosition(NamedTuple):
    """Where a record lies in the data: its file's index among --data_path and its 1-based line there."""

    file: int
    line: int

    def draw(self, seed: int, purpose: str) -> float:
        """A number in [0, 1), uniform over records, fixed by (seed, purpose, position). Different
        `purpose` texts give independent draws for the same record."""
        key = f"{seed}:{purpose}:{self.file}:{self.line}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64

    def choice(self, seed: int, purpose: str, options: tuple | list):
        """One of `options`, drawn like `draw`."""
        return options[min(int(self.draw(seed, purpose) * len(options)), len(options) - 1)]
