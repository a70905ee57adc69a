"""What `export` reads: a training checkpoint (`OUT/checkpoints/step_N`) or a model directory, as models in memory.

A checkpoint is accelerate's save_state output and holds weights only: the architecture and the
tokenizer come from the run's own config.yaml (OUT/config.yaml), exactly as the run built them.
Weights are `model.safetensors` (the tied lm_head left out by save_state) or, under DeepSpeed, a ZeRO
checkpoint whose shards are gathered into one fp32 state dict.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from minimind_scale.config import load_yaml
from minimind_scale.errors import UserError
from minimind_scale.models.build import load_tokenizer

LORA_MARKERS = ("lora_A", "lora_B")


def is_zero_checkpoint(ckpt: Path) -> bool:
    return (ckpt / "latest").is_file()


def read_run_config(ckpt: Path) -> tuple[Path, dict]:
    has_weights = is_zero_checkpoint(ckpt) or (ckpt / "model.safetensors").is_file()
    if not ckpt.is_dir() or not has_weights:
        what = "does not exist" if not ckpt.exists() else (
            "is not a directory" if not ckpt.is_dir() else
            "holds neither model.safetensors nor a ZeRO checkpoint ('latest')")
        raise UserError(f"{ckpt} is not a training checkpoint: it {what}. Give OUT/checkpoints/step_N of a run")
    run_dir = ckpt.resolve().parent.parent
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"{ckpt}: the run's config.yaml is not at {cfg_path}; a checkpoint must stay inside its "
                        "run directory (OUT/checkpoints/step_N), which says which model and tokenizer it belongs to")
    return run_dir, load_yaml(str(cfg_path))


def load_checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    if is_zero_checkpoint(ckpt):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt)))
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def model_config(run_dir: Path, run: dict, tokenizer):
    """The architecture the run trained: its final/config.json, else rebuilt the way the engine built it."""
    from transformers import AutoConfig

    from minimind_scale.models.build import PRESETS, is_model_dir, preset_config
    from minimind_scale.models.model_dir import check_model_dir

    if (run_dir / "final" / "config.json").is_file():
        check_model_dir(run_dir / "final", "the run's final model", need_weights=False)
        return AutoConfig.from_pretrained(run_dir / "final")
    model = str(run.get("model", ""))
    if model in PRESETS:
        return preset_config(model, len(tokenizer), tokenizer, run.get("hidden_size"), run.get("num_hidden_layers"))
    if is_model_dir(model):
        check_model_dir(model, "config.yaml: model", need_weights=False)
        return AutoConfig.from_pretrained(model)
    raise UserError(f"{run_dir / 'config.yaml'}: model '{model}' is neither a preset nor a model directory that "
                    "still exists, and the run has no final/config.json: the architecture cannot be rebuilt")


def load_weights(model, weights: dict[str, torch.Tensor], ckpt: Path) -> None:
    """Strict apart from a tied lm_head, which save_state (and ZeRO) leave out or keep as an alias."""
    tied = (getattr(model.config, "tie_word_embeddings", False)
            or getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    if tied:
        weights = {k: v for k, v in weights.items() if not k.endswith("lm_head.weight")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if tied:
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        bad = (missing or unexpected)[0]
        raise UserError(f"{ckpt}: the weights do not fit the run's architecture: "
                        f"{'missing' if missing else 'unexpected'} key '{bad}'"
                        f" ({len(missing)} missing, {len(unexpected)} unexpected in all)")
    if tied:
        model.tie_weights()


def lora_model(run_dir: Path, run: dict, weights: dict, ckpt: Path):
    """The run's base model wrapped in the LoRA config it trained with, holding the checkpoint's weights."""
    from peft import LoraConfig, get_peft_model

    from minimind_scale.models.build import is_model_dir
    from minimind_scale.models.model_dir import check_model_dir

    base = str(run.get("model", ""))
    if not is_model_dir(base):
        raise UserError(f"{ckpt} is a LoRA checkpoint but its base model '{base}' (config.yaml: model) is not a "
                        "model directory any more")
    check_model_dir(base, "the LoRA base model (config.yaml: model)")
    targets = run.get("target_modules") or run.get("lora_target_modules")
    if not targets:  # the layers that carry adapters, read from the weights themselves
        targets = sorted({k.split(".lora_A.")[0].split(".")[-1] for k in weights if ".lora_A." in k})
    config = LoraConfig(r=int(run.get("lora_rank", 8)), lora_alpha=float(run.get("lora_alpha", 16)),
                        lora_dropout=float(run.get("lora_dropout", 0.0)), target_modules=list(targets),
                        task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    load_weights(model, weights, ckpt)
    return model


def training_stage(ckpt: Path):
    """The StageSpec that wrote the checkpoint, where its trainer state names one that is registered."""
    from minimind_scale.training import registry
    from minimind_scale.training.checkpoint import STATE_FILE, read_state

    stage = read_state(ckpt).stage if (ckpt / STATE_FILE).is_file() else ""
    if not stage:
        return None
    registry.discover()
    return registry.get_stage(stage) if stage in registry.all_names() else None


def checkpoint_models(ckpt: Path, merge_lora: bool, lora_expected: bool = True) -> tuple[dict, object]:
    """({subdir: model}, tokenizer) of a checkpoint: one causal LM under "" (a LoRA run's PeftModel unless
    `merge_lora`), plus a critic under "critic" for a stage that publishes one. `merge_lora` on a checkpoint
    without LoRA weights is the user's mistake when `lora_expected` (they asked for it), else nothing."""
    run_dir, run_cfg = read_run_config(ckpt)
    tokenizer = load_tokenizer(run_cfg.get("tokenizer"), run_cfg.get("model"))
    weights = load_checkpoint_weights(ckpt)
    if any(m in k for k in weights for m in LORA_MARKERS):
        model = lora_model(run_dir, run_cfg, weights, ckpt)
        return {"": model.merge_and_unload() if merge_lora else model}, tokenizer
    if merge_lora and lora_expected:
        raise UserError(f"--merge_lora: {ckpt} holds no LoRA weights (no lora_A / lora_B keys)")
    spec = training_stage(ckpt)
    if spec is not None and spec.build_model is not None:  # another class than a causal LM (a reward model)
        model = spec.build_model(spec.config(**run_cfg), tokenizer)
    else:
        model = AutoModelForCausalLM.from_config(model_config(run_dir, run_cfg, tokenizer), dtype=torch.float32)
    load_weights(model, weights, ckpt)
    return (spec.published_models(model) if spec is not None else {"": model}), tokenizer


def directory_model(model_dir: str, adapter: str | None) -> tuple[object, object]:
    """(model, tokenizer) of a model directory in fp32 on the CPU, a LoRA `adapter` merged into it."""
    from transformers import AutoConfig

    from minimind_scale.inference.loading import load_chat_model
    from minimind_scale.models.model_dir import check_model_dir

    check_model_dir(model_dir, "--model")
    architectures = AutoConfig.from_pretrained(model_dir).architectures or []
    if not all(name.endswith("ForCausalLM") for name in architectures):
        raise UserError(f"--model {model_dir}: a {', '.join(architectures)} is not a causal LM; export reads "
                        "causal LM directories (a reward model's or critic's own directory is already its export)")
    model, tokenizer = load_chat_model(model_dir, adapter, dtype="fp32", device="cpu")
    return (model.merge_and_unload() if adapter is not None else model), tokenizer
