"""`eval`: a model's loss, perplexity and token count on a data set, printed as one JSON line.

The loss is the mean next-token cross-entropy over every loss-bearing token of the data set (the
same tokens, labels and truncation a training stage uses), not a mean of per-batch means, so it
does not depend on the batch size, the padding or the number of processes.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Literal, Optional

import torch
from pydantic import Field
from tqdm.auto import tqdm

from .config import StrictConfig
from .errors import UserError

STAGES = ("pretrain", "full_sft")


class EvalConfig(StrictConfig):
    """Evaluate a model directory on jsonl data. The last stdout line is JSON:
    {"loss": mean token cross-entropy, "ppl": exp(loss), "tokens": loss-bearing tokens, "records": rows}."""

    model: str = Field(..., description="Hugging Face model directory (e.g. out/pretrain/final)")
    data_path: list[str] = Field(default_factory=list, description="one or more jsonl data files")
    max_seq_len: int = Field(512, ge=8, description="tokens per record; longer records keep their prefix (as in training)")
    batch_size: int = Field(8, ge=1, description="records per forward pass per process")
    packing: bool = Field(False, description="pack records per row; the loss is the same either way by design")
    tokenizer: Optional[str] = Field(None, description="tokenizer directory; default: the model's own")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field("fp32", description="weights dtype: auto = bf16 on a GPU that supports it, else fp32")
    num_proc: int = Field(1, ge=1, description="tokenisation worker processes")
    cache_dir: Optional[str] = Field(None, description="tokenised-data cache (default $MINIMIND_SCALE_CACHE or ~/.cache/minimind_scale)")
    skip_bad_records: bool = Field(False, description="skip malformed records (counted on stderr) instead of failing")
    stage: Literal["auto", "pretrain", "full_sft", "sft"] = Field(
        "auto", description="how records are encoded: auto = pretrain when the first record has \"text\", else full_sft")


def detect_stage(path: str) -> str:
    """pretrain for {"text": ...} records, full_sft for anything else (conversations, messages)."""
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                # Let the stage's own reader report the broken line with its number.
                return "full_sft"
            return "pretrain" if isinstance(record, dict) and "text" in record else "full_sft"
    return "full_sft"


def torch_dtype(dtype: str) -> torch.dtype:
    cuda = torch.cuda.is_available()
    if dtype == "fp16" and not cuda:
        raise UserError("dtype fp16 needs a GPU; on a CPU use bf16 or fp32")
    if dtype == "auto":
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def _batches(dataset, batch_size: int):
    for start in range(0, len(dataset), batch_size):
        chunk = dataset[start:start + batch_size]
        yield [dict(zip(chunk, values)) for values in zip(*chunk.values())]


@torch.inference_mode()
def evaluate_rows(model, dataset, pad_id: int, batch_size: int, show_progress: bool = True) -> tuple[float, int, int]:
    """(summed cross-entropy, loss-bearing tokens, records) of `dataset`'s rows, in order; a packed
    row counts each record it holds."""
    from .data import pad_collate, to_device
    from .losses import count_label_tokens, forward_logits, token_cross_entropy_sum

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


def run(cfg: EvalConfig) -> None:
    from transformers import AutoModelForCausalLM

    from . import registry
    from .data import check_data_files, prepare_dataset
    from .models import is_model_dir, load_tokenizer

    world = int(os.environ.get("WORLD_SIZE", 1))
    accelerator = None
    if world > 1:
        from accelerate import Accelerator

        # Without cpu=True, processes on a GPU-less machine never form one group (DESIGN §9).
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        if accelerator.num_processes != world:
            raise UserError(f"the launcher started {world} processes but they formed a group of "
                            f"{accelerator.num_processes}; use torchrun --nproc_per_node N or "
                            "accelerate launch --multi_gpu --num_processes N")
    rank = accelerator.process_index if accelerator else 0
    is_main = rank == 0
    is_local_main = accelerator.is_local_main_process if accelerator else True
    log = (lambda m: print(m, file=sys.stderr)) if is_main else (lambda m: None)
    if not is_main:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one set of bars per run, not one per process

    if not is_model_dir(cfg.model):
        raise UserError(f"model '{cfg.model}' is not a Hugging Face model directory (no config.json)")
    files = check_data_files(cfg.data_path)
    stage = detect_stage(str(files[0])) if cfg.stage == "auto" else cfg.stage
    registry.discover()
    spec = registry.get_stage(stage)
    stage_cfg = spec.config(data_path=cfg.data_path, max_seq_len=cfg.max_seq_len, num_proc=cfg.num_proc,
                            cache_dir=cfg.cache_dir, skip_bad_records=cfg.skip_bad_records, model=cfg.model,
                            packing=cfg.packing)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
    dataset, _, report = prepare_dataset(spec, stage_cfg, tokenizer, is_local_main=is_local_main, log=log)
    if report.skipped:
        log(f"evaluating {report.summary()}")

    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch_dtype(cfg.dtype))
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg.model}: the model failed to load ({type(e).__name__}: {e})") from None
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise UserError(f"{cfg.model}: its vocabulary ({model.get_input_embeddings().num_embeddings}) is smaller "
                        f"than the tokenizer's ({len(tokenizer)})")
    device = accelerator.device if accelerator else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()

    if world > 1:
        dataset = dataset.shard(num_shards=world, index=rank, contiguous=True)
    loss_sum, tokens, records = evaluate_rows(model, dataset, tokenizer.pad_token_id, cfg.batch_size, show_progress=is_main)
    if accelerator is not None:
        totals = torch.tensor([loss_sum, tokens, records], dtype=torch.float64, device=device)
        loss_sum, tokens, records = accelerator.reduce(totals, reduction="sum").tolist()
        tokens, records = int(tokens), int(records)
    if tokens == 0:
        raise UserError("no loss-bearing token in the data (nothing to evaluate)")
    if not is_main:
        return
    loss = loss_sum / tokens
    ppl = math.exp(loss) if loss < 700 else float("inf")
    print(json.dumps({"loss": loss, "ppl": ppl, "tokens": tokens, "records": records}), flush=True)
