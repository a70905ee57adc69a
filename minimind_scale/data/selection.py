"""Which tokenised records a run trains on, epoch by epoch, and which it holds out: caps, the `val` split, weights.

Everything here is a pure function of the per-file record counts and the config (seed included), so every
process computes the same selection and a resumed run the same plan, with nothing to save but the step.

* `--max_samples`: each file keeps a seeded random subset of its records (in file order).
* `--val_size`: a share or count of what the caps kept is held out, from every file in proportion
  (largest-remainder rounding), chosen by the seed; these records are never in a training epoch.
* `--data_weights`: an epoch draws as many records as the training files hold together (N), file i giving
  c_i = round(w_i·N) of them by largest remainder, so the counts are exact and sum to N. A file of n records
  gives each of them c_i // n times (over-sampling), and the other c_i % n from a stream of shuffles of the file:
  without replacement until the file is used up, then from a fresh shuffle, the stream running on across
  epochs (so an under-sampled file shows every record before it repeats one). Without weights, an epoch is
  every training record.
The loader's sampler then shuffles the epoch's records by (seed, epoch), as for any data set.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from minimind_scale.errors import UserError

# Separate streams of the seed for each random choice, so that adding a cap does not move the val split.
_CAP, _VAL, _DRAW = 1, 2, 3


def largest_remainder(total: int, shares: list[float]) -> list[int]:
    """Integers proportional to `shares` that sum exactly to `total`: each its floor, then one more for the
    largest fractional parts (ties to the earlier share)."""
    weights = np.asarray(shares, dtype=np.float64)
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:short]:
        counts[i] += 1
    return [int(c) for c in counts]


def _shuffle(n: int, *key: int) -> np.ndarray:
    """A permutation of range(n) drawn from the seed sequence `key` (a negative seed wraps to 64 bits)."""
    return np.random.default_rng([k % 2**64 for k in key]).permutation(n)


@dataclass
class DataSelection:
    """The training records of each file and the held-out `val` records, as row numbers of the tokenised
    data set (whose rows are the files' kept records, file after file)."""

    train: list[np.ndarray]        # per file: its training rows, in file order
    held_out: list[np.ndarray]     # per file: its rows in `val`, in file order
    weights: list[float] | None    # normalised per-file weights; None: every training record once per epoch
    seed: int
    capped: bool = False

    @property
    def val(self) -> np.ndarray:
        """Every held-out row, in data set order."""
        return np.concatenate([np.zeros(0, dtype=np.int64), *self.held_out]).astype(np.int64)

    @property
    def is_everything(self) -> bool:
        """True when each epoch is simply every row of the data set (no cap, no split, no weights)."""
        return not self.capped and not len(self.val) and self.weights is None

    @property
    def epoch_size(self) -> int:
        return sum(len(rows) for rows in self.train)

    def per_epoch_counts(self) -> list[int]:
        """How many records each file gives to one epoch."""
        if self.weights is None:
            return [len(rows) for rows in self.train]
        return largest_remainder(self.epoch_size, self.weights)

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """The data set rows of `epoch`, file after file (a row appears more than once when its file is
        over-sampled); the sampler shuffles them."""
        if self.weights is None:
            return np.concatenate(self.train) if self.train else np.zeros(0, dtype=np.int64)
        parts = [self._draw(k, epoch, count) for k, count in enumerate(self.per_epoch_counts())]
        return np.concatenate(parts).astype(np.int64)

    def _draw(self, k: int, epoch: int, count: int) -> np.ndarray:
        """File k's `count` records of `epoch`: every training row count // n times, the rest from the stream.
        Whole passes first, so that an over-sampled file never leaves a record out of an epoch (a window of
        the stream alone can straddle two shuffles and miss a record in both)."""
        rows = self.train[k]
        if not len(rows):
            return np.zeros(0, dtype=np.int64)
        passes, rest = divmod(count, len(rows))
        return np.concatenate([np.tile(rows, passes), self._stream(k, rest * epoch, rest)])

    def _stream(self, k: int, start: int, count: int) -> np.ndarray:
        """Items [start, start + count) of file k's endless stream of shuffles of its training rows."""
        rows = self.train[k]
        if count == 0 or not len(rows):
            return np.zeros(0, dtype=np.int64)
        n = len(rows)
        out, position = [], start
        while position < start + count:
            cycle, offset = divmod(position, n)
            take = min(n - offset, start + count - position)
            out.append(rows[_shuffle(n, self.seed, _DRAW, k, cycle)[offset:offset + take]])
            position += take
        return np.concatenate(out)

    def identity(self) -> str:
        """A short hash of what the epochs hold, saved with checkpoints: a resume with other caps, split or
        weights would continue a different plan."""
        h = hashlib.sha256(json.dumps({"weights": self.weights, "seed": self.seed}).encode())
        for rows in [*self.train, self.val]:
            h.update(np.asarray(rows, dtype=np.int64).tobytes())
            h.update(b"|")
        return h.hexdigest()[:16]


def select(file_records: list[int], cfg, files: list[str]) -> DataSelection:
    """The selection for a data set whose file k holds `file_records[k]` kept records."""
    starts = np.concatenate(([0], np.cumsum(file_records)))
    kept = [_cap(k, int(starts[k]), n, cfg) for k, n in enumerate(file_records)]
    val = _hold_out(kept, cfg, files)
    train = [np.setdiff1d(rows, held, assume_unique=True) for rows, held in zip(kept, val)]
    weights = None
    if cfg.data_weights:
        total = float(sum(cfg.data_weights))
        weights = [w / total for w in cfg.data_weights]
        for k, (w, rows) in enumerate(zip(weights, train)):
            if w > 0 and not len(rows):
                raise UserError(f"{files[k]}: weight {cfg.data_weights[k]} but no record of it is left to train on")
    return DataSelection(train=train, held_out=val, weights=weights, seed=cfg.seed, capped=bool(cfg.max_samples))


def _cap(k: int, start: int, n: int, cfg) -> np.ndarray:
    rows = np.arange(start, start + n, dtype=np.int64)
    if not cfg.max_samples:
        return rows
    cap = cfg.max_samples[0] if len(cfg.max_samples) == 1 else cfg.max_samples[k]
    if cap >= n:
        return rows
    return np.sort(rows[_shuffle(n, cfg.seed, _CAP, k)[:cap]])


def _hold_out(kept: list[np.ndarray], cfg, files: list[str]) -> list[np.ndarray]:
    """Each file's held-out rows: `val_size` of all kept records, shared among the files in proportion."""
    if not cfg.val_size:
        return [np.zeros(0, dtype=np.int64) for _ in kept]
    total = sum(len(rows) for rows in kept)
    wanted = round(cfg.val_size * total) if cfg.val_size < 1 else int(cfg.val_size)
    if wanted < 1:
        raise UserError(f"val_size {cfg.val_size} of {total} records holds out no record; give a larger share "
                        "or a count")
    if wanted >= total:
        raise UserError(f"val_size {cfg.val_size} holds out {wanted} of the {total} records, leaving nothing to "
                        "train on")
    counts = largest_remainder(wanted, [len(rows) for rows in kept])
    return [np.sort(rows[_shuffle(len(rows), cfg.seed, _VAL, k)[:c]]) for k, (rows, c) in
            enumerate(zip(kept, counts))]
