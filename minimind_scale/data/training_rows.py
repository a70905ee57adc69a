"""The rows each epoch trains on: the tokenised data set under a data selection (caps, `val`, weights), packed
when the run packs.

Without a selection that changes anything, an epoch is the whole cached data set (packed or not), exactly as
before selections existed. Otherwise an unpacked epoch is a plan of row numbers handed to the sampler (rows
keep their numbers in the data set, so per-row tables such as DPO's reference log-probs still apply), and a
packed epoch is the plan's records packed into a data set of their own, cached by the plan's content.
"""
from __future__ import annotations

import math
from pathlib import Path

import datasets
import numpy as np

from minimind_scale.data.loader import batches_per_epoch
from minimind_scale.data.packing import packed_row_count, prepare_packed
from minimind_scale.data.rows import row_lengths
from minimind_scale.data.selection import DataSelection


class TrainingRows:
    def __init__(self, spec, cfg, unpacked: datasets.Dataset, unpacked_dir: Path, selection: DataSelection,
                 is_local_main: bool = True, log=print):
        self.spec, self.cfg, self.unpacked, self.unpacked_dir = spec, cfg, unpacked, unpacked_dir
        self.selection, self.is_local_main, self.log = selection, is_local_main, log
        self._packed: dict[int, datasets.Dataset] = {}
        self._lengths: np.ndarray | None = None
        self._rows_in_epoch: dict[int, int] = {}

    def lengths(self) -> np.ndarray:
        """Tokens per row of the unpacked data set (0 for rows of a format without input_ids columns, such
        as prompts, whose tokens are generated later)."""
        if self._lengths is None:
            has_ids = any(c.endswith("input_ids") for c in self.unpacked.column_names)
            self._lengths = row_lengths(self.unpacked) if has_ids else np.zeros(len(self.unpacked), dtype=np.int64)
        return self._lengths

    @property
    def varies_by_epoch(self) -> bool:
        return self.selection.weights is not None

    def for_epoch(self, epoch: int) -> tuple[datasets.Dataset, np.ndarray | None]:
        """(the data set the loader reads in `epoch`, the plan of its row numbers for the sampler or None
        for all of its rows)."""
        if not self.cfg.packing:
            return self.unpacked, None if self.selection.is_everything else self.selection.epoch_rows(epoch)
        key = epoch if self.varies_by_epoch else 0
        if key not in self._packed:
            rows = None if self.selection.is_everything else self.selection.epoch_rows(epoch)
            self._packed = {key: prepare_packed(self.spec, self.cfg, self.unpacked_dir, self.is_local_main,
                                                self.log, rows=rows)}
        return self._packed[key], None

    def rows_in_epoch(self, epoch: int) -> int:
        """How many rows (packed rows when packing) the loader reads in `epoch`."""
        if epoch not in self._rows_in_epoch:
            self._rows_in_epoch[epoch] = self._count_rows(epoch)
        return self._rows_in_epoch[epoch]

    def _count_rows(self, epoch: int) -> int:
        if not self.cfg.packing:
            return len(self.unpacked) if self.selection.is_everything else self.selection.epoch_size
        if not self.varies_by_epoch:
            return len(self.for_epoch(0)[0])
        return packed_row_count(self.lengths()[self.selection.epoch_rows(epoch)], self.cfg.max_seq_len)

    def steps_in_epoch(self, epoch: int, world: int) -> int:
        """Optimizer steps (windows of accumulation_steps loader batches) in `epoch`."""
        batches = batches_per_epoch(self.rows_in_epoch(epoch), world, self.cfg.batch_size)
        return math.ceil(batches / self.cfg.accumulation_steps)

    def total_steps(self, world: int) -> int:
        if self.varies_by_epoch:
            return sum(self.steps_in_epoch(e, world) for e in range(self.cfg.epochs))
        return self.steps_in_epoch(0, world) * self.cfg.epochs

    def sources(self, files: list[str]) -> list[dict]:
        """What each data file contributes: records kept for training and held out, records per epoch,
        and the training records' tokens."""
        per_epoch = self.selection.per_epoch_counts()
        weights = self.selection.weights or [None] * len(files)
        return [{"file": str(f), "train_records": len(rows), "val_records": len(held), "records_per_epoch": n,
                 "tokens": int(self.lengths()[rows].sum()), "weight": w}
                for f, rows, held, n, w in zip(files, self.selection.train, self.selection.held_out, per_epoch,
                                               weights)]
