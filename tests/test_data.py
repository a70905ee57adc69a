"""Data pipeline units: caching, dropped samples, sampler positions, padding."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from minimind_scale.data.batching import pad_collate
from minimind_scale.data.loader import EpochSampler
from minimind_scale.data.prepare import prepare_dataset
from minimind_scale.models.build import load_tokenizer
from minimind_scale.training.registry import discover, get_stage


@pytest.fixture(scope="module")
def sft():
    discover()
    return get_stage("sft")


def _cfg(spec, path, tmp_path, **kw):
    # These tests are about records and caching, so rows are records: no packing.
    return spec.config(data_path=[str(path)], num_proc=1, cache_dir=str(tmp_path / "cache"), packing=False, **kw)


def test_sample_without_loss_tokens_is_dropped_and_counted(sft, tmp_path):
    tok = load_tokenizer(None)
    path = tmp_path / "d.jsonl"
    long_question = "why " * 200
    rows = [{"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"conversations": [{"role": "user", "content": long_question}, {"role": "assistant", "content": "ok"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds, where, report = prepare_dataset(sft, _cfg(sft, path, tmp_path, max_seq_len=64), tok, log=lambda *_: None)
    assert len(ds) == 1 and report.too_long == 1 and report.skipped == 0
    assert json.loads((where / "data_report.json").read_text())["too_long"] == 1
    # A longer limit keeps both, in a different cache entry.
    ds2, where2, report2 = prepare_dataset(sft, _cfg(sft, path, tmp_path, max_seq_len=1024), tok, log=lambda *_: None)
    assert len(ds2) == 2 and report2.too_long == 0 and where2 != where


def test_cache_key_follows_content_not_name(sft, tmp_path):
    tok = load_tokenizer(None)
    row = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    _, first, _ = prepare_dataset(sft, _cfg(sft, path, tmp_path), tok, log=lambda *_: None)
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    ds, second, report = prepare_dataset(sft, _cfg(sft, path, tmp_path), tok, log=lambda *_: None)
    assert second != first and len(ds) == 2
    assert report.tokens == sum(len(r) for r in ds["input_ids"])


def test_sampler_skip_continues_the_same_order():
    data = list(range(23))
    full = list(EpochSampler(data, num_replicas=2, rank=1, seed=3, epoch=4))
    resumed = list(EpochSampler(data, num_replicas=2, rank=1, seed=3, epoch=4, skip=5))
    assert resumed == full[5:]
    assert list(EpochSampler(data, 2, 1, seed=3, epoch=5)) != full  # a new epoch reshuffles
    # Both ranks together cover every sample (the last one padded by repetition).
    both = full + list(EpochSampler(data, 2, 0, seed=3, epoch=4))
    assert set(both) == set(data) and len(both) == 24


def test_pad_collate_masks_padding():
    batch = pad_collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def _global_batches(lengths, world, batch, **kw):
    """Per step, the rows every rank takes (rank r's k-th batch is its items k·batch … k·batch+batch-1)."""
    per_rank = [list(EpochSampler(range(len(lengths)), world, r, seed=7, epoch=1, lengths=lengths, batch_size=batch,
                                  **kw))
                for r in range(world)]
    steps = len(per_rank[0]) // batch
    return [[i for r in range(world) for i in per_rank[r][k * batch:(k + 1) * batch]] for k in range(steps)], per_rank


def test_length_grouped_sampler_covers_every_row_once_in_homogeneous_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 512, size=2000)
    steps, per_rank = _global_batches(lengths, world=2, batch=8)
    seen = sorted(i for rank in per_rank for i in rank)
    assert seen == list(range(2000))  # 2000 = 125 steps of 2x8: nothing repeated, nothing lost
    padded = sum(len(s) * max(lengths[s]) for s in steps)
    random_steps = [list(range(k, k + 16)) for k in range(0, 2000, 16)]
    padded_random = sum(len(s) * max(lengths[s]) for s in random_steps)
    assert padded < 0.6 * padded_random  # grouped batches carry far less padding
    assert max(lengths[steps[0]]) == lengths.max()  # the longest row comes first
    # Deterministic for (seed, epoch), reshuffled by a new epoch; skip continues the same order.
    again, _ = _global_batches(lengths, world=2, batch=8)
    assert again == steps
    other = list(EpochSampler(range(2000), 2, 0, seed=7, epoch=2, lengths=lengths, batch_size=8))
    assert other != per_rank[0]
    resumed = list(EpochSampler(range(2000), 2, 0, seed=7, epoch=1, skip=24, lengths=lengths, batch_size=8))
    assert resumed == per_rank[0][24:]


def test_length_grouped_sampler_with_a_ragged_end():
    lengths = np.arange(1, 38)  # 37 rows, 2 ranks x batch 4: a short last step, one row repeated to even out
    steps, per_rank = _global_batches(lengths, world=2, batch=4)
    assert len(per_rank[0]) == len(per_rank[1]) == 19
    assert set(i for rank in per_rank for i in rank) == set(range(37))


def test_pad_collate_to_a_fixed_length():
    rows = [{"input_ids": [5, 6], "labels": [-100, 6]}, {"input_ids": [7], "labels": [7]}]
    batch = pad_collate(rows, pad_id=0, length=6)
    assert batch["input_ids"].shape == (2, 6)
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert pad_collate(rows, pad_id=0)["input_ids"].shape == (2, 2)
