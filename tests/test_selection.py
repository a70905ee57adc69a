"""Which records a run trains on and holds out (data/selection.py), and the loader reading an epoch's plan.

The expectations are computed here independently: largest-remainder counts worked out by hand, per-file
counts read off row ranges, balance of a stream of shuffles from counting, the loader's order from torch's
own DistributedSampler.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from minimind_scale.config import TrainConfig
from minimind_scale.data.loader import EpochSampler, make_loader
from minimind_scale.data.selection import largest_remainder, select
from minimind_scale.errors import UserError


def _select(file_records: list[int], **options):
    """The selection of files holding `file_records` records under these config options."""
    files = [f"f{k}.jsonl" for k in range(len(file_records))]
    cfg = TrainConfig(data_path=files, **options)
    return select(file_records, cfg, files)


def _ranges(file_records: list[int]) -> list[range]:
    """Each file's rows in the tokenised data set (its records, file after file)."""
    starts = np.concatenate(([0], np.cumsum(file_records)))
    return [range(int(a), int(b)) for a, b in zip(starts, starts[1:])]


def _per_file(rows: np.ndarray, file_records: list[int]) -> list[int]:
    return [int(((rows >= r.start) & (rows < r.stop)).sum()) for r in _ranges(file_records)]


def _file_part(rows: np.ndarray, r: range) -> np.ndarray:
    return rows[(rows >= r.start) & (rows < r.stop)]


# ------------------------------------------------------------------ largest remainder

@pytest.mark.parametrize(("total", "shares", "expected"), [
    (7, [1, 1, 1], [3, 2, 2]),              # 2.33 each: rounding gives 6, one short; the tie goes to the first
    (5, [1, 1, 1], [2, 2, 1]),              # 1.67 each: rounding gives 6, one too many
    (2, [1, 1, 1, 1], [1, 1, 0, 0]),        # 0.5 each: Python's rounding to even gives 0 each
    (32, [0.5, 0.3, 0.2], [16, 10, 6]),     # 16, 9.6, 6.4: rounding sums to 32 and agrees
    (10, [0.62, 0.19, 0.19], [6, 2, 2]),    # 6.2, 1.9, 1.9
    (40, [3, 1], [30, 10]),                 # shares need not be normalised
    (9, [0, 2, 1], [0, 6, 3]),              # a zero share gets nothing
])
def test_largest_remainder_sums_exactly(total, shares, expected):
    assert largest_remainder(total, shares) == expected


def test_largest_remainder_is_within_one_and_rounds_like_round_where_round_sums_up():
    """Over random cases: the counts sum to the total, each is its exact share's floor or ceiling, every
    share rounded up has a larger fractional part than every share rounded down, and where plain rounding
    already sums to the total (with no fraction at .5) the counts are exactly the rounded shares."""
    rng = np.random.default_rng(0)
    agreed = 0
    for _ in range(500):
        total = int(rng.integers(0, 200))
        shares = rng.random(int(rng.integers(1, 6))) + 0.01
        counts = np.array(largest_remainder(total, list(shares)))
        exact = total * shares / shares.sum()
        assert counts.sum() == total
        assert np.all((counts == np.floor(exact)) | (counts == np.floor(exact) + 1))
        fractions = exact - np.floor(exact)
        up, down = fractions[counts > np.floor(exact)], fractions[counts == np.floor(exact)]
        assert not len(up) or not len(down) or up.min() >= down.max()
        rounded = np.array([round(x) for x in exact])
        if rounded.sum() == total and not np.any(np.isclose(fractions, 0.5)):
            assert counts.tolist() == rounded.tolist()
            agreed += 1
    assert agreed > 100  # the comparison with plain rounding did happen


# ------------------------------------------------------------------ weighted epochs

def test_every_epoch_gives_each_file_its_largest_remainder_count():
    files = [5, 7, 20]
    sel = _select(files, data_weights=[0.5, 0.3, 0.2], seed=1)
    assert sel.per_epoch_counts() == [16, 10, 6] == largest_remainder(32, [0.5, 0.3, 0.2])
    for epoch in range(6):
        rows = sel.epoch_rows(epoch)
        assert len(rows) == 32 and _per_file(rows, files) == [16, 10, 6]


def test_weights_are_normalised():
    a = _select([5, 7, 20], data_weights=[5, 3, 2], seed=1)
    b = _select([5, 7, 20], data_weights=[0.5, 0.3, 0.2], seed=1)
    assert a.weights == pytest.approx([0.5, 0.3, 0.2])
    for epoch in range(3):
        assert a.epoch_rows(epoch).tolist() == b.epoch_rows(epoch).tolist()


def test_without_weights_an_epoch_is_every_training_record_once():
    sel = _select([5, 7], seed=1)
    assert sel.is_everything and sel.per_epoch_counts() == [5, 7]
    assert sel.epoch_rows(0).tolist() == sel.epoch_rows(3).tolist() == list(range(12))


def test_weights_in_proportion_to_the_files_draw_every_record_once_an_epoch():
    sel = _select([5, 10, 15], data_weights=[1, 2, 3], seed=4)
    assert sel.per_epoch_counts() == [5, 10, 15]
    for epoch in range(3):
        assert sorted(sel.epoch_rows(epoch).tolist()) == list(range(30))


def _assert_balanced(counts: np.ndarray, draws: int) -> None:
    """After `draws` draws from a stream of shuffles of n rows, each row came floor(draws/n) or one more times."""
    base = draws // len(counts)
    assert counts.sum() == draws
    assert np.all((counts == base) | (counts == base + 1)), (draws, counts.tolist())


@pytest.mark.parametrize("seed", range(4))
def test_an_under_weighted_file_shows_every_record_before_repeating_one(seed):
    """20 records giving 6 a epoch: over consecutive epochs the file's records come as a stream of
    shuffles, so after any number of epochs no record came twice more often than another."""
    files = [20, 12]
    sel = _select(files, data_weights=[6, 26], seed=seed)
    assert sel.per_epoch_counts()[0] == 6
    seen = np.zeros(20, dtype=np.int64)
    for epoch in range(12):
        part = _file_part(sel.epoch_rows(epoch), _ranges(files)[0])
        if epoch < 3:  # the first 18 draws fit in the first shuffle: all different
            assert len(set(part.tolist()) & set(np.flatnonzero(seen).tolist())) == 0
        seen += np.bincount(part, minlength=20)
        _assert_balanced(seen, 6 * (epoch + 1))


@pytest.mark.parametrize("seed", range(4))
def test_an_over_weighted_file_gives_every_record_in_every_epoch(seed):
    """5 records giving 7 a epoch: each comes at least once in each epoch (never left out, as a window
    of 7 draws across two shuffles could leave it), and over the epochs the extra draws go round the
    records evenly."""
    files = [5, 7]
    sel = _select(files, data_weights=[7, 5], seed=seed)
    assert sel.per_epoch_counts() == [7, 5]
    seen = np.zeros(5, dtype=np.int64)
    for epoch in range(10):
        counts = np.bincount(_file_part(sel.epoch_rows(epoch), _ranges(files)[0]), minlength=5)
        assert counts.min() >= 7 // 5, (epoch, counts.tolist())
        seen += counts
        _assert_balanced(seen, 7 * (epoch + 1))


def test_a_heavily_over_weighted_file_repeats_every_record_floor_c_over_n_times():
    """3 records giving 17 a epoch (33 at weight one half, the tie to the first file): each at least 5
    times; the other file's 16 a epoch of its 30 run through it without replacement."""
    files = [3, 30]
    sel = _select(files, data_weights=[0.5, 0.5], seed=2)
    assert sel.per_epoch_counts() == [17, 16]
    seen = np.zeros(30, dtype=np.int64)
    for epoch in range(4):
        counts = np.bincount(_file_part(sel.epoch_rows(epoch), _ranges(files)[0]), minlength=3)
        assert counts.min() >= 17 // 3 and counts.sum() == 17
        seen += np.bincount(_file_part(sel.epoch_rows(epoch), _ranges(files)[1]) - 3, minlength=30)
        _assert_balanced(seen, 16 * (epoch + 1))


def test_the_same_seed_gives_the_same_epochs_another_seed_others():
    files = [20, 12]
    first, again = _select(files, data_weights=[1, 3], seed=5), _select(files, data_weights=[1, 3], seed=5)
    other = _select(files, data_weights=[1, 3], seed=6)
    for epoch in range(3):
        assert first.epoch_rows(epoch).tolist() == again.epoch_rows(epoch).tolist()
    assert first.epoch_rows(0).tolist() != first.epoch_rows(1).tolist()
    assert any(first.epoch_rows(e).tolist() != other.epoch_rows(e).tolist() for e in range(3))


def test_identity_follows_the_selection():
    base = _select([20, 12], data_weights=[1, 3], seed=5)
    assert base.identity() == _select([20, 12], data_weights=[1, 3], seed=5).identity()
    for changed in (_select([20, 12], data_weights=[1, 2], seed=5), _select([20, 12], data_weights=[1, 3], seed=6),
                    _select([20, 12], data_weights=[1, 3], seed=5, max_samples=[10]),
                    _select([20, 12], data_weights=[1, 3], seed=5, val_size=2)):
        assert changed.identity() != base.identity()


# ------------------------------------------------------------------ caps

def _kept(sel) -> list[np.ndarray]:
    """Each file's records kept by the caps: its training rows and its held-out rows together."""
    return [np.sort(np.concatenate([t, h])) for t, h in zip(sel.train, sel.held_out)]


@pytest.mark.parametrize(("caps", "expected"), [([4], [4, 3, 4]), ([2, 3, 5], [2, 3, 5]), ([9, 1, 8], [9, 1, 8])])
def test_caps_keep_a_seeded_subset_of_exactly_n_per_file(caps, expected):
    files = [10, 3, 8]
    sel = _select(files, max_samples=caps, seed=3)
    kept = _kept(sel)
    assert [len(rows) for rows in kept] == expected
    for rows, r in zip(kept, _ranges(files)):
        assert set(rows.tolist()) <= set(r) and len(set(rows.tolist())) == len(rows)
    assert sel.epoch_size == sum(expected) and not sel.is_everything
    # stable across calls (every process computes the same), another seed draws another subset
    assert [k.tolist() for k in _kept(_select(files, max_samples=caps, seed=3))] == [k.tolist() for k in kept]
    if caps == [4]:
        assert _kept(_select(files, max_samples=caps, seed=4))[0].tolist() != kept[0].tolist()


def test_a_cap_at_or_above_a_file_keeps_all_of_it():
    sel = _select([10, 3], max_samples=[10, 50], seed=3)
    assert [k.tolist() for k in _kept(sel)] == [list(range(10)), [10, 11, 12]]


def test_the_val_split_does_not_move_the_caps():
    files = [30, 10]
    assert ([k.tolist() for k in _kept(_select(files, max_samples=[8], seed=3, val_size=4))]
            == [k.tolist() for k in _kept(_select(files, max_samples=[8], seed=3))])


# ------------------------------------------------------------------ val

@pytest.mark.parametrize(("val_size", "expected"), [(0.1, [3, 1, 6]), (7, [2, 1, 4]), (0.25, [8, 2, 15])])
def test_val_is_proportional_per_file_and_disjoint_from_train(val_size, expected):
    """0.1 of 100 records from files of 30, 10, 60 is 3, 1, 6; a count of 7 is 2.1, 0.7, 4.2 -> 2, 1, 4;
    0.25 is 7.5, 2.5, 15 -> 8, 2, 15 (the largest remainders, ties to the earlier file)."""
    files = [30, 10, 60]
    sel = _select(files, val_size=val_size, seed=11)
    assert [len(h) for h in sel.held_out] == expected
    for train, held, r in zip(sel.train, sel.held_out, _ranges(files)):
        assert not set(train.tolist()) & set(held.tolist())
        assert sorted(train.tolist() + held.tolist()) == list(r)
    assert sel.val.tolist() == sorted(np.concatenate(sel.held_out).tolist())
    assert sel.epoch_size == 100 - sum(expected)
    assert not set(sel.epoch_rows(0).tolist()) & set(sel.val.tolist())


def test_val_is_the_same_for_the_same_seed_whatever_the_weights():
    files = [30, 10, 60]
    plain = _select(files, val_size=0.2, seed=11).val.tolist()
    for weights in ([1, 1, 1], [0.2, 0.5, 0.3], [0, 1, 4]):
        sel = _select(files, val_size=0.2, seed=11, data_weights=weights)
        assert sel.val.tolist() == plain
        assert not set(np.concatenate([sel.epoch_rows(e) for e in range(3)]).tolist()) & set(plain)
    assert _select(files, val_size=0.2, seed=12).val.tolist() != plain


@pytest.mark.parametrize(("val_size", "message"), [(100, "nothing to train"), (150, "nothing to train"),
                                                   (0.999, "nothing to train"), (0.004, "holds out no record")])
def test_val_sizes_that_leave_nothing_to_train_or_hold_out_nothing_are_refused(val_size, message):
    with pytest.raises(UserError, match=message):
        _select([30, 10, 60], val_size=val_size, seed=1)


def test_a_weighted_file_left_with_nothing_to_train_on_is_refused():
    """2 held out of files of 1 and 2 records: 0.67 and 1.33 -> 1 and 1, the whole first file."""
    assert [len(h) for h in _select([1, 2], val_size=2, seed=0).held_out] == [1, 1]
    with pytest.raises(UserError, match="f0.jsonl: weight 1.0 but no record of it is left to train on"):
        _select([1, 2], val_size=2, seed=0, data_weights=[1, 1])
    assert _select([1, 2], val_size=2, seed=0, data_weights=[0, 1]).per_epoch_counts() == [0, 1]


# ------------------------------------------------------------------ the loader with a plan

BATCH = 3


def _read(plan: np.ndarray, rank: int, world: int, seed: int, epoch: int, skip_batches: int = 0,
          lengths: np.ndarray | None = None) -> list[int]:
    """The row numbers the loader gives `rank`, in order (a data set whose row i is the number i)."""
    rows = list(range(int(plan.max()) + 1))
    loader = make_loader(rows, list, BATCH, world, rank, seed, epoch, skip_batches=skip_batches, plan=plan,
                         lengths=lengths)
    return [row for batch in loader for row in batch]


def _expected(plan: np.ndarray, rank: int, world: int, seed: int, epoch: int) -> list[int]:
    """What torch's DistributedSampler deals `rank` over the plan's positions, as row numbers."""
    sampler = DistributedSampler(range(len(plan)), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    return [int(plan[i]) for i in sampler]


@pytest.mark.parametrize("world", [1, 2])
def test_each_rank_reads_the_plan_shuffled_as_a_data_set_of_its_length(world):
    files = [20, 12]
    sel = _select(files, data_weights=[1, 3], val_size=4, seed=5)
    for epoch in range(2):
        plan = sel.epoch_rows(epoch)
        read = [_read(plan, rank, world, seed=5, epoch=epoch) for rank in range(world)]
        assert read == [_expected(plan, rank, world, seed=5, epoch=epoch) for rank in range(world)]
        # Together the ranks read the plan (one padded when its length is odd), never a held-out row.
        together = sorted(row for rows in read for row in rows)
        padding = world * len(read[0]) - len(plan)
        assert len(together) == len(plan) + padding
        assert set(together) == set(plan.tolist()) and not set(together) & set(sel.val.tolist())
        if padding == 0:
            assert together == sorted(plan.tolist())


@pytest.mark.parametrize("skip_batches", [1, 3, 5])
def test_skip_batches_resumes_mid_epoch_exactly(skip_batches):
    plan = _select([20, 12], data_weights=[1, 3], seed=5).epoch_rows(1)
    for rank in range(2):
        whole = _read(plan, rank, 2, seed=5, epoch=1)
        assert _read(plan, rank, 2, seed=5, epoch=1, skip_batches=skip_batches) == whole[skip_batches * BATCH:]


def test_length_grouped_batches_follow_the_plans_lengths():
    """With lengths, the plan's positions are grouped by the lengths of the rows they name."""
    plan = _select([20, 12], data_weights=[1, 3], seed=5).epoch_rows(0)
    lengths = np.arange(32) % 7 + 1
    for rank in range(2):
        positions = EpochSampler(range(len(plan)), 2, rank, 5, 0, lengths=lengths[plan], batch_size=BATCH)
        read = _read(plan, rank, 2, seed=5, epoch=0, lengths=lengths)
        assert read == [int(plan[i]) for i in positions]
        assert _read(plan, rank, 2, seed=5, epoch=0, skip_batches=2, lengths=lengths) == read[2 * BATCH:]
    # the first global batch holds the longest row
    firsts = [_read(plan, rank, 2, seed=5, epoch=0, lengths=lengths)[:BATCH] for rank in range(2)]
    assert max(int(lengths[r]) for rows in firsts for r in rows) == int(lengths[plan].max())


def test_the_loader_s_shuffle_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    _read(_select([20, 12], data_weights=[1, 3], seed=5).epoch_rows(0), 0, 1, seed=5, epoch=0)
    assert torch.equal(torch.rand(1), before)
