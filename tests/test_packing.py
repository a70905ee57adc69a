"""Packing: the row plan, the packed columns, isolation inside the model, and equal losses end to end."""
from __future__ import annotations

import json
import random

import datasets
import pytest
import torch

from conftest import DEMO, read_metrics, run_cli
from minimind_scale.data.batching import REAL_TOKENS, VARLEN_KEYS, pad_collate, token_counts
from minimind_scale.data.packing import best_fit_decreasing, pack_dataset
from minimind_scale.data.prepare import prepare_dataset
from minimind_scale.errors import UserError
from minimind_scale.losses.causal_lm import count_label_tokens, forward_logits, shifted_labels
from minimind_scale.training.registry import discover, get_stage

TINY = ["--model", "tiny", "--dtype", "fp32", "--log_interval", "1", "--num_proc", "1", "--seed", "3"]


pytestmark = pytest.mark.usefixtures("one_thread")


def first_fit_in_order(lengths, capacity):
    bins, free = [], []
    for i, n in enumerate(lengths):
        for b, f in enumerate(free):
            if f >= n:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(capacity - n)
    return bins


# --------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_decreasing_is_a_valid_tight_deterministic_plan(seed):
    rng = random.Random(seed)
    capacity = 64
    lengths = [rng.choice([rng.randint(1, 12), rng.randint(20, 64)]) for _ in range(300)]
    bins = best_fit_decreasing(lengths, capacity)
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert best_fit_decreasing(list(lengths), capacity) == bins
    assert len(bins) <= len(first_fit_in_order(lengths, capacity))
    # Never worse than the trivial lower bound allows by much: BFD is within 11/9 OPT + 1.
    assert len(bins) <= 11 / 9 * (-(-sum(lengths) // capacity)) + 1


def test_best_fit_picks_the_tightest_bin_and_breaks_ties_by_index():
    # 5 and 5 fill bins alone; 4 opens a bin with 1 free; 3 opens one with 2 free; the first 2 (index 1)
    # fits exactly beside 3; the second 2 (index 6) opens a bin; 1 goes to the bin with 1 free, not 3.
    assert best_fit_decreasing([3, 2, 4, 1, 5, 5, 2], 5) == [[4], [5], [2, 3], [0, 1], [6]]
    with pytest.raises(ValueError):
        best_fit_decreasing([6], 5)


# --------------------------------------------------------------------------- the packed columns


def test_packed_columns_restart_positions_and_mask_each_later_first_label():
    samples = [[11, 12, 13], [21, 22], [31, 32, 33, 34], [41]]
    labels = [[11, 12, 13], [-100, 22], [31, -100, 33, 34], [41]]
    ds = datasets.Dataset.from_dict({"input_ids": samples, "labels": labels})
    packed, report = pack_dataset(ds, max_seq_len=5)
    rows = packed[:]
    assert set(packed.column_names) == {"input_ids", "labels", "position_ids"}
    # BFD: [2, 3] then [0, 1].
    assert rows["input_ids"] == [[31, 32, 33, 34, 41], [11, 12, 13, 21, 22]]
    assert rows["position_ids"] == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert rows["labels"] == [[31, -100, 33, 34, -100], [11, 12, 13, -100, 22]]
    assert (report.samples, report.rows, report.tokens) == (4, 2, 10) and report.efficiency == 1.0
    # The loss-bearing tokens after the shift are exactly the unpacked ones.
    unpacked = sum(int(count_label_tokens(pad_collate([{"input_ids": s, "labels": lab}], 0)))
                   for s, lab in zip(samples, labels))
    assert int(count_label_tokens(pad_collate([dict(zip(rows, v)) for v in zip(*rows.values())], 0))) == unpacked
    with pytest.raises(ValueError, match="columns"):
        pack_dataset(ds.add_column("other", [1, 2, 3, 4]), max_seq_len=5)


def test_collate_carries_position_ids_boundaries_and_no_mask_for_packed_rows():
    batch = pad_collate([{"input_ids": [5, 6, 7], "labels": [5, -100, 7], "position_ids": [0, 0, 1]},
                         {"input_ids": [8], "labels": [8], "position_ids": [0]}], pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids", REAL_TOKENS, *VARLEN_KEYS}  # no attention_mask
    assert batch[REAL_TOKENS] == 4
    # What the engine counts: one loss-bearing token (7; a first label predicts nothing) and 4 real tokens.
    assert [int(n) for n in token_counts(batch)] == [1, 4]
    assert batch["position_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert batch["labels"].tolist() == [[5, -100, 7], [8, -100, -100]]
    # Flattened: samples [5] [6 7] | [8], then the second row's padding tail as one segment.
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 1, 3, 4, 6]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 2
    padded = pad_collate([{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [7], "labels": [7]}], pad_id=0)
    assert set(padded) == {"input_ids", "labels", "attention_mask"}  # counted by its mask
    assert [int(n) for n in token_counts(padded)] == [1, 3]


def varlen_reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                               cu_seq_lens_q=None, **kwargs):
    """Causal attention within the segments `cu_seq_lens_q` marks on the flattened batch, and nowhere else:
    the contract flash-attention's varlen kernels follow. Plain softmax(QK^T)V, so it shares no code with
    SDPA; it ignores the mask and the position ids, so only the boundaries can keep samples apart."""
    rows, heads, width, dim = query.shape
    key = key.repeat_interleave(heads // key.shape[1], dim=1)
    value = value.repeat_interleave(heads // value.shape[1], dim=1)
    q, k, v = (t.transpose(0, 1).reshape(heads, rows * width, dim) for t in (query, key, value))
    # Without boundaries (an unpacked batch with no padding) each row is one sequence.
    bounds = cu_seq_lens_q.tolist() if cu_seq_lens_q is not None else list(range(0, rows * width + 1, width))
    out = torch.zeros_like(q)
    for start, end in zip(bounds[:-1], bounds[1:]):
        scores = q[:, start:end] @ k[:, start:end].transpose(1, 2) * (scaling or dim ** -0.5)
        causal = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        out[:, start:end] = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, start:end]
    return out.reshape(heads, rows, width, dim).permute(1, 2, 0, 3), None


@pytest.fixture(scope="module")
def varlen_reference():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("varlen_reference", varlen_reference_attention)
    AttentionMaskInterface.register("varlen_reference", lambda *args, **kwargs: None)  # no mask: boundaries only
    return "varlen_reference"


# --------------------------------------------------------------------------- inside the model


@pytest.fixture(scope="module")
def tiny():
    from minimind_scale.models.build import build_model, load_tokenizer

    tok = load_tokenizer(None)
    torch.manual_seed(0)
    model = build_model("tiny", tok).float().eval()
    return model, tok


def _samples(tok, n: int = 7):
    lines = (DEMO / "sft.jsonl").read_text().splitlines()[:n]
    out = []
    for k, line in enumerate(lines):
        conv = json.loads(line)["conversations"]
        ids = tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"][: 20 + 9 * k]
        labels = [t if j % 3 else -100 for j, t in enumerate(ids)]
        out.append({"input_ids": ids, "labels": labels})
    return out


def ce_sum_fp64(logits, labels) -> float:
    """The training loss's token sum, accumulated in float64 so that summation order cannot hide
    (or fake) a difference at 1e-5."""
    return float(torch.nn.functional.cross_entropy(logits.double().reshape(-1, logits.size(-1)),
                                                   shifted_labels(labels).reshape(-1), ignore_index=-100,
                                                   reduction="sum"))


@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen_reference"])
def test_packed_rows_are_isolated_and_the_loss_is_unchanged(tiny, attn, varlen_reference):
    model, tok = tiny
    model.set_attn_implementation(attn)
    assert model.config._attn_implementation == attn
    samples = _samples(tok)
    ds = datasets.Dataset.from_dict({k: [s[k] for s in samples] for k in ("input_ids", "labels")})
    cap = max(len(s["input_ids"]) for s in samples) + 10
    packed, report = pack_dataset(ds, max_seq_len=cap)
    rows = [packed[i] for i in range(len(packed))]
    assert report.rows < len(samples) and any(r["position_ids"].count(0) > 1 for r in rows)
    # Rows of different lengths in one batch: the shorter rows end in padding.
    assert len({len(r["input_ids"]) for r in rows}) > 1
    plan = best_fit_decreasing([len(s["input_ids"]) for s in samples], cap)

    with torch.no_grad():
        batch = pad_collate(rows, tok.pad_token_id)
        logits = forward_logits(model, batch).logits
        packed_sum = ce_sum_fp64(logits, batch["labels"])
        alone_sum, alone_tokens = 0.0, 0
        for r, members in enumerate(plan):
            at = 0
            for i in members:
                single = pad_collate([samples[i]], tok.pad_token_id)
                ref = forward_logits(model, single).logits[0]
                n = len(samples[i]["input_ids"])
                torch.testing.assert_close(logits[r, at:at + n], ref, atol=1e-5, rtol=0)
                at += n
                alone_sum += ce_sum_fp64(ref[None], single["labels"])
                alone_tokens += int(count_label_tokens(single))
    assert int(count_label_tokens(batch)) == alone_tokens
    print("packed vs alone CE sum", packed_sum, alone_sum, packed_sum - alone_sum)
    assert packed_sum == pytest.approx(alone_sum, abs=1e-5)
    model.set_attn_implementation("sdpa")


def test_without_position_ids_the_rows_would_leak(tiny):
    """The isolation test above can fail: the same packed row without restarting position ids differs."""
    model, tok = tiny
    samples = _samples(tok, 2)
    ds = datasets.Dataset.from_dict({k: [s[k] for s in samples] for k in ("input_ids", "labels")})
    packed, _ = pack_dataset(ds, max_seq_len=1000)
    batch = pad_collate([packed[0]], tok.pad_token_id)
    with torch.no_grad():
        good = forward_logits(model, batch).logits
        bad = forward_logits(model, {"input_ids": batch["input_ids"]}).logits
    assert (good - bad).abs().max() > 1e-3


def test_without_boundaries_a_varlen_kernel_would_leak(tiny, varlen_reference):
    """What transformers' flash path does with several packed rows and no boundaries (each row one causal
    sequence) differs from the isolated result, so the varlen case above can fail."""
    model, tok = tiny
    samples = _samples(tok, 4)
    ds = datasets.Dataset.from_dict({k: [s[k] for s in samples] for k in ("input_ids", "labels")})
    packed, _ = pack_dataset(ds, max_seq_len=max(len(s["input_ids"]) for s in samples) + 40)
    batch = pad_collate([packed[i] for i in range(len(packed))], tok.pad_token_id)
    rows, width = batch["input_ids"].shape
    whole_rows = torch.arange(0, rows * width + 1, width, dtype=torch.int32)
    model.set_attn_implementation(varlen_reference)
    try:
        with torch.no_grad():
            good = forward_logits(model, batch).logits
            bad = forward_logits(model, {**batch, "cu_seq_lens_q": whole_rows, "cu_seq_lens_k": whole_rows}).logits
    finally:
        model.set_attn_implementation("sdpa")
    assert (good - bad).abs().max() > 1e-3


# --------------------------------------------------------------------------- through the data cache and the CLI


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    """Demo conversations of 1-4 turns: lengths vary a lot, so packing has something to do."""
    rows = [json.loads(line) for line in (DEMO / "sft.jsonl").read_text().splitlines()[:120]]
    out = tmp_path_factory.mktemp("pack") / "sft.jsonl"
    with open(out, "w") as f:
        i = 0
        for n in range(40):
            turns = 1 + (n * 5) % 4
            conv = [m for r in rows[i:i + turns] for m in r["conversations"][-2:]]
            i += turns
            f.write(json.dumps({"conversations": conv}) + "\n")
    return out


def test_prepare_dataset_caches_the_packed_variant_beside_the_unpacked(sft_file, tmp_path):
    from minimind_scale.models.build import load_tokenizer

    discover()
    spec = get_stage("sft")
    tok = load_tokenizer(None)
    cfg = dict(data_path=[str(sft_file)], num_proc=1, cache_dir=str(tmp_path), max_seq_len=256)
    plain, where, report = prepare_dataset(spec, spec.config(packing=False, **cfg), tok, log=lambda *_: None)
    logs = []
    packed, where2, _ = prepare_dataset(spec, spec.config(packing=True, **cfg), tok, log=logs.append)
    assert where2 == where and (where.parent / f"{where.name}-packed" / "packing_report.json").is_file()
    assert "efficiency" in logs[-1] and len(packed) < len(plain) == report.records
    assert sum(len(r) for r in packed["input_ids"]) == sum(len(r) for r in plain["input_ids"])
    assert all(len(r) <= 256 for r in packed["input_ids"])
    assert sum(p.count(0) for p in packed["position_ids"]) == len(plain)
    again, _, _ = prepare_dataset(spec, spec.config(packing=True, **cfg), tok, log=lambda *_: None)
    assert again["input_ids"] == packed["input_ids"]
    with pytest.raises(UserError, match="dpo"):
        dpo = get_stage("dpo")
        prepare_dataset(dpo, dpo.config(packing=True, **cfg), tok, log=lambda *_: None)


def test_cli_eval_packed_equals_unpacked_and_packed_sft_trains(sft_file, tmp_path, data_cache):
    common = ["--data_path", str(sft_file), "--max_seq_len", "256", "--batch_size", "4"]
    run_cli(["sft", *common, *TINY, "--max_steps", "3", "--packing", "false", "--out_dir", str(tmp_path / "m"),
             "--learning_rate", "3e-3"], data_cache)
    model = tmp_path / "m" / "final"
    ev = {p: json.loads(run_cli(["eval", "--model", str(model), *common, "--num_proc", "1", "--packing", p],
                                data_cache).stdout.strip().splitlines()[-1]) for p in ("true", "false")}
    assert ev["true"]["tokens"] == ev["false"]["tokens"] and ev["true"]["records"] == ev["false"]["records"] == 40
    assert ev["true"]["loss"] == pytest.approx(ev["false"]["loss"], abs=1e-5)

    # Same rows per batch: packed optimizer steps see more samples, so an epoch has fewer rows.
    train = ["sft", *common, *TINY, "--max_steps", "10", "--learning_rate", "3e-3", "--accumulation_steps", "1"]
    packed = run_cli([*train, "--packing", "true", "--out_dir", str(tmp_path / "p")], data_cache)
    losses = [r["loss"] for r in read_metrics(tmp_path / "p")]
    assert len(losses) == 10 and losses[-1] < losses[0]
    assert "packed 40 samples into" in packed.stderr + packed.stdout
    plain = run_cli(["prepare", "sft", *common, "--num_proc", "1", "--packing", "false"], data_cache)
    packed_prep = run_cli(["prepare", "sft", *common, "--num_proc", "1", "--packing", "true"], data_cache)
    # The contract: prepare's last line is the unpacked data set, packed or not.
    assert packed_prep.stdout.strip().splitlines()[-1] == plain.stdout.strip().splitlines()[-1]
    rows_packed = len(datasets.load_from_disk(packed_prep.stdout.strip().splitlines()[-1] + "-packed"))
    assert rows_packed < 40
