"""`eval`: a model's loss, perplexity and token count on a data set, printed as one JSON line.

The loss is the mean next-token cross-entropy over every loss-bearing token of the data set (the
same tokens, labels and truncation a training stage uses), not a mean of per-batch means, so it
does not depend on the batch size, the padding or the number of processes. A stage that declares
`eval_metrics` is measured through its own collate and loss instead, each metric a mean over every
loss unit, counted as that stage counts it in training (`--stage reward`: a reward model's pairwise
accuracy and mean margin over every pair).

Whatever eval needs to know about a stage it asks the stage's StageSpec: which data format it reads
(`recognizes`, for `--stage auto`), which config fields measuring sets (`eval_overrides`), which
metrics it reports, and which kind of model it trains (`model_kind`).
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from minimind_scale.config import StrictConfig
from minimind_scale.errors import UserError

# Still importable from here, where benchmarks/cache_identity.py reads it; eval itself asks spec.eval_overrides.
from minimind_scale.inference.loading import load_pretrained, pick_dtype
from minimind_scale.models.yarn import DEFAULT_ORIGINAL_POSITIONS, YarnFactor, YarnOriginalPositions, load_config
from minimind_scale.rl.reward_model import check_reward_model
from minimind_scale.training import registry

# `--stage auto` asks these stages, in order, which one recognises the data's first record; a record none
# recognises (or a line that is not JSON) goes to the last, whose encoder then reports what is wrong with it.
AUTO_STAGES = ("pretrain", "full_sft")


class EvalConfig(StrictConfig):
    """Evaluate a model directory on jsonl data. The last stdout line is JSON:
    {"loss": mean token cross-entropy, "ppl": exp(loss), "tokens": loss-bearing tokens, "records": rows};
    with stage reward {"accuracy": share of pairs with r_chosen > r_rejected (a tie is wrong),
    "margin": mean r_chosen − r_rejected, "pairs": pairs}."""

    model: str = Field(..., description="Hugging Face model directory (e.g. out/pretrain/final)")
    data_path: list[str] = Field(default_factory=list, description="one or more jsonl data files")
    max_seq_len: int = Field(512, ge=8,
                             description="tokens per record; longer records keep their prefix (as in training)")
    batch_size: int = Field(8, ge=1, description="records per forward pass per process")
    packing: bool = Field(False, description="pack records per row; the loss is the same either way by design")
    tokenizer: str | None = Field(None, description="tokenizer directory; default: the model's own")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "fp32", description="weights dtype: auto = bf16 on a GPU that supports it, else fp32")
    num_proc: int = Field(1, ge=1, description="tokenisation worker processes")
    cache_dir: str | None = Field(None, description="tokenised-data cache (default $MINIMIND_SCALE_CACHE or "
                                  "~/.cache/minimind_scale)")
    skip_bad_records: bool = Field(False, description="skip malformed records (counted on stderr) instead of failing")
    stage: Literal["auto", "pretrain", "full_sft", "sft", "reward"] = Field(
        "auto", description="how records are encoded: auto = pretrain when the first record has \"text\", "
                            "else full_sft; reward = chosen/rejected pairs scored by a reward model")
    yarn_factor: YarnFactor = None
    yarn_original_max_position_embeddings: YarnOriginalPositions = DEFAULT_ORIGINAL_POSITIONS


def detect_stage(path: str) -> str:
    """The first of AUTO_STAGES whose StageSpec recognises the first record of `path`, else the last."""
    registry.discover()
    record = first_record(path)
    return next((name for name in AUTO_STAGES if registry.get_stage(name).recognizes(record)), AUTO_STAGES[-1])


def first_record(path: str):
    """The first non-blank line of `path`, parsed; None when there is none or it is not JSON (the stage's
    own reader reports a broken line with its number)."""
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    return json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return None
    return None


def torch_dtype(dtype: str) -> torch.dtype:
    from minimind_scale.training.distributed import check_fp16_available

    check_fp16_available(dtype)
    return pick_dtype(dtype)


def _batches(dataset, batch_size: int):
    for start in range(0, len(dataset), batch_size):
        chunk = dataset[start:start + batch_size]
        yield [dict(zip(chunk, values)) for values in zip(*chunk.values())]


@torch.inference_mode()
def evaluate_rows(model, dataset, pad_id: int, batch_size: int, show_progress: bool = True) -> tuple[float, int, int]:
    """(summed cross-entropy, loss-bearing tokens, records) of `dataset`'s rows, in order; a packed
    row counts each record it holds."""
    from minimind_scale.data.batching import pad_collate, to_device
    from minimind_scale.losses.causal_lm import count_label_tokens, forward_logits, token_cross_entropy_sum

    device = next(model.parameters()).device
    dataset = dataset.select_columns([c for c in ("input_ids", "labels", "position_ids") if c in dataset.column_names])
    loss_sum, tokens, records = 0.0, 0, 0
    bar = tqdm(total=len(dataset), desc="eval", unit="rec", file=sys.stderr, disable=not show_progress)
    for rows in _batches(dataset, batch_size):
        batch = to_device(pad_collate(rows, pad_id), device)
        logits = forward_logits(model, batch).logits
        # Summed in float64 on the host: thousands of fp32 partial sums would drift.
        loss_sum += token_cross_entropy_sum(logits, batch["labels"]).double().item()
        tokens += int(count_label_tokens(batch))
        records += sum(r["position_ids"].count(0) if "position_ids" in r else 1 for r in rows)
        bar.update(len(rows))
    bar.close()
    return loss_sum, tokens, records


@torch.inference_mode()
def evaluate_metrics(model, dataset, spec, stage_cfg, tokenizer, batch_size: int,
                     show_progress: bool = True) -> list[float]:
    """[Σ of each of the stage's eval_metrics, then Σ loss units] over `dataset`'s rows, through the stage's
    own collate and loss, whose metrics are sums over loss units: eval counts as training logs."""
    from minimind_scale.data.batching import to_device

    device = next(model.parameters()).device
    sums, units = [0.0] * len(spec.eval_metrics), 0
    bar = tqdm(total=len(dataset), desc="eval", unit="row", file=sys.stderr, disable=not show_progress)
    for rows in _batches(dataset, batch_size):
        batch = to_device(spec.collate(rows, tokenizer, stage_cfg), device)
        out = spec.loss(model, batch, stage_cfg, None)
        for i, name in enumerate(spec.eval_metrics):
            sums[i] += out.metrics[name].double().item()
        units += int(spec.loss_units(batch))
        bar.update(len(rows))
    bar.close()
    return sums + [units]


def load_model(cfg: EvalConfig, tokenizer, model_kind: str):
    """The model of `cfg.model`, as the kind the stage trains: a causal LM, or a reward model (a sequence
    classifier)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    reward = model_kind == "reward_model"
    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    config = load_config(cfg.model, cfg.yarn_factor, cfg.yarn_original_max_position_embeddings)
    model = load_pretrained(auto, cfg.model, torch_dtype(cfg.dtype), config)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise UserError(f"{cfg.model}: its vocabulary ({model.get_input_embeddings().num_embeddings}) is smaller "
                        f"than the tokenizer's ({len(tokenizer)})")
    if reward:  # the score is read at the last token that is not the padding this tokenizer adds
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def summary(totals: list[float], spec) -> dict:
    """The printed result from the summed totals of every process."""
    if spec.eval_metrics:
        *sums, units = totals
        if units == 0:
            raise UserError(f"no {spec.units_name} in the data (nothing to evaluate)")
        return {**{name: total / units for name, total in zip(spec.eval_metrics, sums)}, spec.units_name: int(units)}
    loss_sum, tokens, records = totals
    if tokens == 0:
        raise UserError("no loss-bearing token in the data (nothing to evaluate)")
    loss = loss_sum / tokens
    ppl = math.exp(loss) if loss < 700 else float("inf")
    return {"loss": loss, "ppl": ppl, "tokens": int(tokens), "records": int(records)}


def run(cfg: EvalConfig) -> None:
    from minimind_scale.data.prepare import check_data_files, prepare_dataset
    from minimind_scale.models.build import load_tokenizer
    from minimind_scale.models.model_dir import check_model_dir

    world = int(os.environ.get("WORLD_SIZE", 1))
    accelerator = None
    if world > 1:
        from accelerate import Accelerator

        from minimind_scale.training.distributed import check_group_size

        # Without cpu=True, processes on a GPU-less machine never form one group.
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        check_group_size(accelerator, world)
    rank = accelerator.process_index if accelerator else 0
    is_main = rank == 0
    is_local_main = accelerator.is_local_main_process if accelerator else True
    log = (lambda m: print(m, file=sys.stderr)) if is_main else (lambda m: None)
    if not is_main:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one set of bars per run, not one per process

    check_model_dir(cfg.model, "--model")
    files = check_data_files(cfg.data_path)
    registry.discover()
    spec = registry.get_stage(detect_stage(str(files[0])) if cfg.stage == "auto" else cfg.stage)
    if spec.model_kind == "reward_model":
        check_reward_model(cfg.model, f"eval --stage {cfg.stage}")
    # Scored as given: the stage's eval_overrides switch off what would change the data being measured
    # (the SFT family's added system prompts and removed empty think blocks).
    stage_cfg = spec.config(data_path=cfg.data_path, max_seq_len=cfg.max_seq_len, num_proc=cfg.num_proc,
                            cache_dir=cfg.cache_dir, skip_bad_records=cfg.skip_bad_records, model=cfg.model,
                            packing=cfg.packing, **spec.eval_overrides)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
    dataset, _, report = prepare_dataset(spec, stage_cfg, tokenizer, is_local_main=is_local_main, log=log)
    if report.skipped:
        log(f"evaluating {report.summary()}")

    model = load_model(cfg, tokenizer, spec.model_kind)
    device = accelerator.device if accelerator else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()

    if world > 1:
        dataset = dataset.shard(num_shards=world, index=rank, contiguous=True)
    if spec.eval_metrics:
        totals = evaluate_metrics(model, dataset, spec, stage_cfg, tokenizer, cfg.batch_size, show_progress=is_main)
    else:
        totals = evaluate_rows(model, dataset, tokenizer.pad_token_id, cfg.batch_size, show_progress=is_main)
    totals = list(totals)
    if accelerator is not None:
        totals = accelerator.reduce(torch.tensor(totals, dtype=torch.float64, device=device), reduction="sum").tolist()
    result = summary(totals, spec)
    if is_main:
        print(json.dumps(result), flush=True)
