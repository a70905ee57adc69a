"""A stage that makes its own micro-batches through the engine's rollout seam.

`resplit` trains what full_sft trains, but its rollout turns each loader batch into one micro-batch
per conversation. The engine normalises over the micro-batches the rollout returned, so the step
losses must be those of full_sft. The rollout also checks the conditions the engine promises it
(no gradients, eval mode, the unwrapped model) and counts its calls in the stage state, which is
checkpointed.
"""
from dataclasses import dataclass

import torch

from minimind_scale import StageState, register_stage
from minimind_scale.stages.full_sft import SPEC as SFT


@dataclass
class CountingState(StageState):
    rollouts: int = 0

    def state_dict(self):
        return {"rollouts": self.rollouts}


def one_row_per_micro_batch(model, batches, cfg, ctx):
    if torch.is_grad_enabled() or model.training or hasattr(model, "module"):
        raise RuntimeError("rollout ran with gradients, in train mode or on a wrapped model")
    ctx.state.rollouts += 1
    micro = []
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            row = {k: batch[k][i:i + 1] for k in ("input_ids", "labels", "attention_mask")}
            micro.append(row)
    return micro


register_stage(SFT.model_copy(update={"name": "resplit", "aliases": (), "help": "full_sft, one row per micro-batch",
                                      "rollout": one_row_per_micro_batch, "state": CountingState}))
