"""Which rows each rank trains on, in which order: samplers and the data loader.

The order depends only on (seed, epoch, world size, and with length grouping the batch size), so a
resumed run continues from the exact sample where its checkpoint was written.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DistributedSampler


class EpochSampler(DistributedSampler):
    """This rank's shuffled indices for one epoch (seed + epoch), starting after `skip` samples.

    The order depends only on (seed, epoch, world size, and with `lengths` the batch size), which is
    what lets a resumed run continue from the exact sample where the checkpoint was written.

    With `lengths` (one per row) the order is length-grouped: shuffled rows are cut into mega-batches
    of GROUPED_BATCHES global batches, each sorted by length and cut into global batches, whose order
    is shuffled again (the batch holding the longest row goes first, so running out of memory
    happens at step 1, not hours in). Each rank's next `batch_size` rows come from the same global
    batch, so all ranks step on rows of similar length.
    """

    GROUPED_BATCHES = 50

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, epoch: int, skip: int = 0,
                 shuffle: bool = True, lengths: np.ndarray | None = None, batch_size: int = 1):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.set_epoch(epoch)
        self.skip = skip
        self.lengths = lengths
        self.batch_size = batch_size

    def __iter__(self):
        indices = list(super().__iter__()) if self.lengths is None else self._length_grouped()
        return iter(indices[self.skip:])

    def _length_grouped(self) -> list[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        n = len(self.lengths)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        order += order[:self.total_size - n]  # pad as DistributedSampler does, so ranks get equal counts
        global_batch = self.batch_size * self.num_replicas
        mega = global_batch * self.GROUPED_BATCHES
        ranked = [i for start in range(0, len(order), mega)
                  for i in sorted(order[start:start + mega], key=lambda j: -int(self.lengths[j]))]
        batches = [ranked[start:start + global_batch] for start in range(0, len(ranked), global_batch)]
        # A short last global batch stays last, or ranks would take rows from two different batches.
        full = batches if len(batches[-1]) == global_batch else batches[:-1]
        shuffled = [full[k] for k in torch.randperm(len(full), generator=g).tolist()] if self.shuffle else full
        if shuffled:
            longest = max(range(len(shuffled)), key=lambda k: int(self.lengths[shuffled[k][0]]))
            shuffled.insert(0, shuffled.pop(longest))
        flat = [i for b in shuffled + batches[len(full):] for i in b]
        return flat[self.rank:self.total_size:self.num_replicas]

    def __len__(self):
        return max(0, self.num_samples - self.skip)


def batches_per_epoch(n_rows: int, world: int, batch_size: int) -> int:
    return math.ceil(math.ceil(n_rows / world) / batch_size)


# The key under which a row carries its position in the data set, for a stage that declares `row_index`.
ROW_INDEX = "_index"


class IndexedRows(torch.utils.data.Dataset):
    """Rows with their position in the data set as ROW_INDEX, so a stage can look up per-row state
    it computed once (e.g. DPO's precomputed reference log-probabilities)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return {**self.dataset[int(i)], ROW_INDEX: int(i)}


class PlannedSampler(torch.utils.data.Sampler):
    """An EpochSampler over the positions of a plan (data set row numbers, possibly repeated: a data
    selection's epoch), yielding the row numbers: the epoch's rows shuffled exactly as a data set of
    that many rows would be."""

    def __init__(self, positions: EpochSampler, plan: np.ndarray):
        self.positions, self.plan = positions, np.asarray(plan, dtype=np.int64)

    def __iter__(self):
        return (int(self.plan[i]) for i in self.positions)

    def __len__(self):
        return len(self.positions)


def make_loader(dataset, collate, batch_size: int, world: int, rank: int, seed: int, epoch: int,
                skip_batches: int = 0, shuffle: bool = True, num_workers: int = 0,
                lengths: np.ndarray | None = None, with_index: bool = False, plan: np.ndarray | None = None):
    """`lengths` (see rows.row_lengths) switches to length-grouped batches; `with_index` gives every row
    its position in the data set as ROW_INDEX (a StageSpec's `row_index`); `plan`, the row numbers this
    epoch reads (default: every row once)."""
    if plan is None:
        sampler = EpochSampler(dataset, world, rank, seed, epoch, skip=skip_batches * batch_size, shuffle=shuffle,
                               lengths=lengths, batch_size=batch_size)
    else:
        positions = EpochSampler(range(len(plan)), world, rank, seed, epoch, skip=skip_batches * batch_size,
                                 shuffle=shuffle, lengths=None if lengths is None else lengths[plan],
                                 batch_size=batch_size)
        sampler = PlannedSampler(positions, plan)
    # Its own generator: an iterator otherwise draws its workers' base seed from the global RNG, so a resumed
    # run (which starts a fresh iterator mid-epoch) would shift every later draw, sampling included.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.utils.data.DataLoader(IndexedRows(dataset) if with_index else dataset, batch_size=batch_size,
                                       sampler=sampler, collate_fn=collate, num_workers=num_workers, drop_last=False,
                                       pin_memory=torch.cuda.is_available(), persistent_workers=False,
                                       generator=generator)
