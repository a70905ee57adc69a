"""dpo: direct preference optimisation on {"chosen": [messages], "rejected": [messages]} pairs.

The unit of the loss is the pair: `loss` returns the sum of per-pair losses and every metric as a sum
over pairs, so the engine's per-step normalisation reports means over all pairs of the step. Rows and
batches of pairs come from data/pair_rows.py (shared with the reward stage).
"""
from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import torch
from pydantic import Field

from minimind_scale import LossOutput, StageSpec, StageState, TrainConfig, register_stage
from minimind_scale.config import BatchSize, LearningRate, MaxSeqLen, ModelSource, OutDir
from minimind_scale.data import pair_rows
from minimind_scale.data.cache import file_fingerprint, fingerprint_dir
from minimind_scale.data.loader import ROW_INDEX
from minimind_scale.data.pair_rows import split_pairs
from minimind_scale.errors import UserError
from minimind_scale.losses.causal_lm import forward_logits
from minimind_scale.losses.preference import dpo_loss, sequence_logprobs
from minimind_scale.models.build import is_model_dir
from minimind_scale.models.model_dir import check_model_dir


class DPOConfig(TrainConfig):
    """MiniMind's DPO set-up (train_dpo.py): batch 4, 1024-token conversations, 1 epoch, beta 0.15.
    lr 1e-6: MiniMind goes down to 4e-8 for long runs on large preference sets; on small data a small
    model needs ~1e-6 to move at all, and DPO diverges quickly above ~1e-5."""

    model: ModelSource = Field("out/full_sft/final",
                               description="the policy's starting model (usually an SFT run's final/)")
    ref_model: str | None = Field(None, description="frozen reference model directory (default: a copy of the "
                                  "starting model)")
    beta: float = Field(0.15, gt=0, description="strength of the KL tie to the reference (DPO's beta)")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid",
                                                          description="sigmoid = DPO, ipo = IPO, hinge = SLiC")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="assumed rate of flipped preference labels "
                                   "(conservative DPO; sigmoid only)")
    precompute_ref: bool = Field(False, description="compute the reference log-probs once before training (cached) "
                                 "and free the reference model")
    learning_rate: LearningRate = 1e-6
    batch_size: BatchSize = Field(4, description="preference pairs per micro-batch per process (2x rows: chosen + "
                                  "rejected)")
    max_seq_len: MaxSeqLen = 1024
    out_dir: OutDir = "out/dpo"


@dataclass
class DPOState(StageState):
    """The frozen reference: a model scored on every batch, or with precompute_ref its log-probs for
    every row ([rows, 2]: chosen, rejected), computed once in setup: `ref_logps` for the training rows,
    `eval_ref_logps[name]` for each held-out set's rows (a batch's ROW_INDEX counts rows within its set)."""

    ref_model: torch.nn.Module | None = None
    ref_logps: torch.Tensor | None = None
    eval_ref_logps: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def reference_logps(ref, batch: dict, accelerator) -> torch.Tensor:
    with accelerator.autocast():
        logits = forward_logits(ref, batch).logits
    return sequence_logprobs(logits, batch["labels"])


def check_reference(cfg) -> None:
    """A --ref_model directory is whole, before any tokenising."""
    if cfg.ref_model is not None:
        check_model_dir(cfg.ref_model, "--ref_model")


def load_reference(model, cfg, ctx):
    """A frozen fp32 reference. It is a full replica on every rank even under ZeRO-3 (never passed
    to accelerator.prepare): fine for MiniMind's sizes, and `precompute_ref` frees it anyway."""
    if cfg.ref_model is None:
        ref = copy.deepcopy(model)
    else:
        check_model_dir(cfg.ref_model, "--ref_model")
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(cfg.ref_model, dtype=torch.float32)
        if ref.config.vocab_size != model.config.vocab_size:
            raise UserError(f"ref_model {cfg.ref_model} has a vocabulary of {ref.config.vocab_size} tokens and the "
                            f"policy {cfg.model} has {model.config.vocab_size}: they must share a tokenizer")
    ref.eval().requires_grad_(False)
    return ref.to(ctx.accelerator.device)


def reference_cache_file(cfg, rows, held_out: bool, precision: str) -> Path | None:
    """Next to the tokenised data set (whose directory name already keys the data, tokenizer and
    max_seq_len), named by the reference weights and the precision; None when the reference is a
    preset's random initialisation, which is not worth caching. A held-out set's name also carries a
    digest of its rows: `val` is a selection from the training set's directory, so that directory alone
    does not say which rows it holds."""
    source = cfg.ref_model or cfg.model
    weights = sorted(Path(source).glob("*.safetensors")) + sorted(Path(source).glob("*.bin"))
    files = rows.cache_files
    if not is_model_dir(source) or not weights or not files:
        return None
    identity = {
        "weights": [file_fingerprint(p, fingerprint_dir(cfg)) for p in weights],
        "precision": precision,
        "rows": len(rows),
    }
    if held_out:
        identity["content"] = rows_digest(rows)
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:20]
    return Path(files[0]["filename"]).parent / f"dpo_ref_logps-{key}.pt"


def rows_digest(rows) -> str:
    """sha256 of the rows' contents (every column, in order), as Arrow's stream format writes them."""
    table = rows.with_format("arrow")[0:len(rows)]
    # Taken afresh into one chunk: the same rows then have the same buffers however they were selected.
    table = table.take(pa.array(range(len(table)))).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()


def precompute_reference(ref, rows, cfg, ctx, what: str) -> torch.Tensor:
    """[rows, 2] reference log-probs (chosen, rejected) for every row of `rows` (`what` names them).

    Rank r scores rows r, r+W, r+2W, ... and an all-gather assembles the table, so the one-off cost
    is divided among the processes and every rank ends with the whole table (the training sampler
    may hand any row to any rank in later epochs).
    """
    acc = ctx.accelerator
    world, rank, n = acc.num_processes, acc.process_index, len(rows)
    per_rank = -(-n // world)
    mine = torch.zeros(per_rank, 2, dtype=torch.float32, device=acc.device)
    indices = list(range(rank, n, world))
    if acc.is_main_process:
        print(f"[dpo] precomputing reference log-probs for {n} pairs{what}")
    for start in range(0, len(indices), cfg.batch_size):
        chunk = indices[start:start + cfg.batch_size]
        batch = pair_rows.collate([rows[i] for i in chunk], ctx.tokenizer, cfg)
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        chosen, rejected = split_pairs(reference_logps(ref, batch, acc))
        mine[start:start + len(chunk)] = torch.stack([chosen, rejected], dim=1).float()
    gathered = acc.gather(mine) if world > 1 else mine
    # gathered[r·per_rank + j] is row r + j·world: interleave back to row order.
    return gathered.view(world, per_rank, 2).transpose(0, 1).reshape(world * per_rank, 2)[:n].cpu()


def cached_everywhere(caches: list[Path | None], acc) -> list[bool]:
    """For each cache file, whether every rank has it. Every rank must take the same branch per table, or
    the ranks that compute would wait forever in the gather."""
    have = torch.tensor([float(c is not None and c.is_file()) for c in caches], device=acc.device)
    total = acc.reduce(have, reduction="sum") if acc.num_processes > 1 else have
    return [float(t) == acc.num_processes for t in total]


def save_table(table: torch.Tensor, cache: Path | None, acc) -> None:
    """Publish a reference table to its cache file under one rename (one writer per machine)."""
    if cache is not None and acc.is_local_main_process:
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
        torch.save(table, tmp)
        os.replace(tmp, cache)


def setup(model, cfg, ctx):
    """The reference: loaded and kept, or (precompute_ref) its log-probs for the training rows and every
    held-out set, read from the cache where every rank has them, computed otherwise, and the model freed."""
    acc = ctx.accelerator
    if not cfg.precompute_ref:
        ctx.state.ref_model = load_reference(model, cfg, ctx)
        return model
    sets = [(None, ctx.dataset), *ctx.eval_sets.items()]
    caches = [reference_cache_file(cfg, rows, name is not None, acc.mixed_precision) for name, rows in sets]
    ref, tables = None, []
    for (name, rows), cache, cached in zip(sets, caches, cached_everywhere(caches, acc)):
        what = "" if name is None else f" of evaluation set '{name}'"
        if cached:
            tables.append(torch.load(cache))
            if acc.is_main_process:
                print(f"[dpo] using cached reference log-probs{what} {cache}")
            continue
        if ref is None:
            ref = load_reference(model, cfg, ctx)
        tables.append(precompute_reference(ref, rows, cfg, ctx, what))
        save_table(tables[-1], cache, acc)
    del ref
    gc.collect()
    ctx.state.ref_logps = tables[0]
    ctx.state.eval_ref_logps = dict(zip(ctx.eval_sets, tables[1:]))
    return model


def reference_table(ctx) -> torch.Tensor | None:
    """The precomputed reference log-probs of the rows being measured: the training set's, or while
    evaluating the held-out set's; None when the reference model scores each batch instead."""
    if ctx.evaluating is not None and ctx.state.ref_logps is not None:
        return ctx.state.eval_ref_logps[ctx.evaluating]
    return ctx.state.ref_logps


def loss(model, batch: dict, cfg, ctx) -> LossOutput:
    logps = sequence_logprobs(forward_logits(model, batch).logits, batch["labels"])
    policy_chosen, policy_rejected = split_pairs(logps)
    table = reference_table(ctx)
    if table is not None:
        ref = table[batch[ROW_INDEX].cpu()].to(logps.device)
        ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
    else:
        ref_chosen, ref_rejected = split_pairs(reference_logps(ctx.state.ref_model, batch, ctx.accelerator))
    losses, rewards_chosen, rewards_rejected = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                        cfg.beta, cfg.loss_type, cfg.label_smoothing)
    metrics = {
        "rewards_chosen": rewards_chosen.sum(),
        "rewards_rejected": rewards_rejected.sum(),
        "reward_accuracy": (rewards_chosen > rewards_rejected).float().sum(),
        "reward_margin": (rewards_chosen - rewards_rejected).sum(),
        "logps_chosen": policy_chosen.detach().sum(),
        "logps_rejected": policy_rejected.detach().sum(),
    }
    return LossOutput(losses.sum(), metrics)


SPEC = register_stage(StageSpec(
    name="dpo",
    help="direct preference optimisation on chosen/rejected conversation pairs (DPO, IPO, hinge)",
    config=DPOConfig,
    encode=pair_rows.encode,
    encode_batch=pair_rows.encode_batch,
    collate=pair_rows.collate,
    loss=loss,
    loss_units=pair_rows.count_pairs,
    check=check_reference,
    setup=setup,
    state=DPOState,
    packable=False,
    fixed_length=True,
    row_index=True,
    record_keys=pair_rows.RECORD_KEYS,
    eval_metrics=("reward_accuracy", "reward_margin"),
    units_name="pairs",
))
