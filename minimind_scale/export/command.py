"""`export`: a training checkpoint or a model directory -> a Hugging Face model directory (`--format hf`, the
default) or one GGUF file for llama.cpp and Ollama with a Modelfile beside it (`--format gguf`)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from minimind_scale.config import StrictConfig
from minimind_scale.errors import UserError
from minimind_scale.models.yarn import DEFAULT_ORIGINAL_POSITIONS, YarnFactor, YarnOriginalPositions, apply_yarn

GgufType = Literal["f32", "f16", "bf16", "q8_0", "q4_k_m"]


class ExportConfig(StrictConfig):
    """Turn a checkpoint directory (OUT/checkpoints/step_N, plain or DeepSpeed ZeRO) or a model directory into a
    model directory that AutoModelForCausalLM loads with no custom code and every stage accepts as --model
    (--format hf), or into one GGUF file that llama.cpp, llama-server and Ollama run (--format gguf)."""

    checkpoint: str | None = Field(None, description="a checkpoint directory: OUT/checkpoints/step_N")
    model: str | None = Field(None, description="a model directory (OUT/final, OUT/best, an exported one) instead "
                                                "of a checkpoint")
    adapter: str | None = Field(None, description="with --model: a LoRA adapter directory, merged into the model")
    format: Literal["hf", "gguf"] = Field("hf", description="hf: a Hugging Face model directory (--out_dir); "
                                                            "gguf: one GGUF file (--out_file) and an Ollama Modelfile")
    out_dir: str | None = Field(None, description="--format hf: where the Hugging Face model directory is written")
    out_file: str | None = Field(None, description="--format gguf: the .gguf file to write; the Modelfile goes "
                                                   "beside it")
    gguf_type: GgufType = Field("f16", description="--format gguf: the weights' type: f32, f16, bf16, q8_0 or "
                                                   "q4_k_m (llama.cpp's quantiser); norms and the MoE router "
                                                   "stay f32")
    overwrite: bool = Field(False, description="--format gguf: replace an existing --out_file and Modelfile")
    merge_lora: bool = Field(False, description="LoRA runs: merge the adapter into the base and write a full model "
                                                "(default for hf: write the adapter; gguf always merges)")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="--format hf: precision of the written "
                                                                       "weights")
    yarn_factor: YarnFactor = None
    yarn_original_max_position_embeddings: YarnOriginalPositions = DEFAULT_ORIGINAL_POSITIONS

    @model_validator(mode="after")
    def _one_source_and_its_outputs(self):
        problems = []
        if (self.checkpoint is None) == (self.model is None):
            problems.append("give exactly one of --checkpoint (OUT/checkpoints/step_N) and --model (a model "
                            "directory)")
        if self.adapter is not None and self.model is None:
            problems.append("--adapter goes with --model (a checkpoint of a LoRA run carries its adapter)")
        if self.format == "hf":
            if self.out_dir is None:
                problems.append("--format hf writes a model directory: give --out_dir")
            if self.out_file is not None:
                problems.append("--out_file is for --format gguf; --format hf writes --out_dir")
        else:
            if self.out_file is None:
                problems.append("--format gguf writes one file: give --out_file model.gguf")
            if self.out_dir is not None:
                problems.append("--out_dir is for --format hf; --format gguf writes --out_file")
            if self.dtype != "fp32":
                problems.append("--dtype is for --format hf; a GGUF file's weights take --gguf_type")
        if problems:
            raise ValueError("\n".join(problems))
        return self


def with_yarn(model, cfg: ExportConfig):
    """`model` with the YaRN options set in its config. Only the written config changes: YaRN rescales
    positions when the model runs, not its weights."""
    apply_yarn(model.config, cfg.yarn_factor, cfg.yarn_original_max_position_embeddings)
    return model


def load_models(cfg: ExportConfig, merge_lora: bool) -> tuple[dict, object]:
    """({subdir: model}, tokenizer) from --checkpoint or --model (+ --adapter)."""
    from minimind_scale.export.sources import checkpoint_models, directory_model

    if cfg.checkpoint is not None:
        return checkpoint_models(Path(cfg.checkpoint), merge_lora, lora_expected=cfg.merge_lora)
    model, tokenizer = directory_model(cfg.model, cfg.adapter)
    return {"": model}, tokenizer


def export_hf(cfg: ExportConfig) -> Path:
    from minimind_scale.inference.loading import DTYPES
    from minimind_scale.models.build import save_hf

    dtype = DTYPES[cfg.dtype]
    parts, tokenizer = load_models(cfg, cfg.merge_lora)
    out = Path(cfg.out_dir)
    adapter_only = hasattr(parts[""], "peft_config")
    if adapter_only:
        if cfg.yarn_factor is not None:
            raise UserError("--yarn_factor: an adapter has no config of its own to carry it; add --merge_lora "
                            "true to write a full model, or pass --yarn_factor to chat/serve/eval with it")
        # Without merging, the natural export of a LoRA run is its adapter, as final/ holds it.
        parts[""].to(dtype).save_pretrained(out)
        tokenizer.save_pretrained(out)
    else:
        for subdir, part in parts.items():  # a policy and its critic: out/ and out/critic/
            save_hf(with_yarn(part, cfg).to(dtype), tokenizer, out / subdir)
    return out


def export_gguf(cfg: ExportConfig) -> Path:
    from minimind_scale.export.gguf_file import check_outputs, write_gguf

    out = Path(cfg.out_file)
    check_outputs(out, cfg.overwrite)
    parts, tokenizer = load_models(cfg, merge_lora=True)  # a GGUF file holds a whole model: LoRA is merged
    write_gguf(with_yarn(parts[""], cfg), tokenizer, out, cfg.gguf_type)
    return out


def run(cfg: ExportConfig) -> Path:
    source = cfg.checkpoint or cfg.model
    out = export_hf(cfg) if cfg.format == "hf" else export_gguf(cfg)
    from minimind_scale.export.sources import is_zero_checkpoint

    zero = " (ZeRO)" if cfg.checkpoint and is_zero_checkpoint(Path(cfg.checkpoint)) else ""
    adapter_only = cfg.format == "hf" and (out / "adapter_config.json").is_file()
    note = " (adapter only; --merge_lora writes a full model)" if adapter_only else ""
    if cfg.format == "gguf":
        note = f" ({cfg.gguf_type}) and {out.parent / 'Modelfile'}"
    print(f"exported {source}{zero} -> {out}{note}")
    return out
