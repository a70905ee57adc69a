"""A stage that trains what full_sft trains and writes down every row it trains on.

`recorded_sft` is full_sft with its loss wrapped: each training micro-batch's rows (input ids with their
attention mask, or packed rows with their position ids) are appended as JSON lines to the file named by
$RECORD_BATCHES_FILE before the loss is computed. Batches measured on a held-out set (ctx.evaluating set)
are not written, so the file holds exactly what the model was trained on, for tests of which records
the training saw.
"""
import json
import os

from minimind_scale import register_stage
from minimind_scale.stages.full_sft import SPEC as SFT

ROW_KEYS = ("input_ids", "attention_mask", "position_ids")


def batch_rows(batch: dict) -> list[dict]:
    """The batch as one {key: list} per row, for the keys that say where its samples are."""
    present = [k for k in ROW_KEYS if k in batch]
    columns = {k: batch[k].tolist() for k in present}
    return [{k: columns[k][i] for k in present} for i in range(len(columns["input_ids"]))]


def recording_loss(model, batch, cfg, ctx):
    """full_sft's loss, after appending a training batch's rows to $RECORD_BATCHES_FILE."""
    if ctx is not None and ctx.evaluating is None:
        with open(os.environ["RECORD_BATCHES_FILE"], "a") as f:
            for row in batch_rows(batch):
                f.write(json.dumps(row) + "\n")
    return SFT.loss(model, batch, cfg, ctx)


register_stage(SFT.model_copy(update={"name": "recorded_sft", "aliases": (), "loss": recording_loss,
                                      "help": "full_sft, writing every training row to $RECORD_BATCHES_FILE"}))
