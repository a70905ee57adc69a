"""Model directories a run publishes (final/, best/): Hugging Face format, written whole or not at all,
and the whole-weights view they (and generation) need under ZeRO-3."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from minimind_scale.data.publish import STAGING_PREFIX, publish_once
from minimind_scale.models.build import save_hf
from minimind_scale.training.checkpoint import write_failures_reported


def gathered_parameters(accelerator, model):
    """Under ZeRO-3 each rank holds a shard of every weight; generation and evaluation need them whole."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()))


def save_model_dir(run, name: str, record: dict | None = None, record_file: str | None = None) -> Path:
    """out_dir/<name>/ in Hugging Face format (with the stage's extra outputs), published like a checkpoint:
    complete or absent, replacing an older one. `record` is written into it as `record_file` (JSON).
    Every process must call it: under DeepSpeed each joins the gather of the sharded weights."""
    acc, target = run.accelerator, run.out_dir / name
    # Otherwise the model's own state dict (with its tied embedding) is what save_pretrained expects.
    state_dict = acc.get_state_dict(run.model) if acc.state.deepspeed_plugin is not None else None
    if acc.is_main_process:
        model, staging = acc.unwrap_model(run.model), run.out_dir / f"{STAGING_PREFIX}{name}"

        def write(path: Path) -> None:
            for subdir, (part, part_state) in model_parts(run.spec, model, state_dict).items():
                save_hf(part, run.ctx.tokenizer, path / subdir, state_dict=part_state)
            if run.spec.finalize is not None:
                run.spec.finalize(model, run.ctx.tokenizer, path, run.cfg, run.ctx)
            if record is not None:
                (path / record_file).write_text(json.dumps(record, indent=1))

        with write_failures_reported(run.out_dir, staging):
            publish_once(target, write, is_complete=Path.is_dir, staging=staging, replace=True, waiters=False)
    acc.wait_for_everyone()
    return target


def model_parts(spec, model, state_dict: dict | None) -> dict[str, tuple]:
    """{subdirectory of a model directory: (model, its slice of a gathered state dict or None)}."""
    prefixes = {id(module): name for name, module in model.named_modules()}
    parts = {}
    for subdir, part in spec.published_models(model).items():
        prefix = prefixes[id(part)] + "." if prefixes[id(part)] else ""
        sliced = None if state_dict is None else {k[len(prefix):]: v for k, v in state_dict.items()
                                                   if k.startswith(prefix)}
        parts[subdir] = (part, sliced)
    return parts
