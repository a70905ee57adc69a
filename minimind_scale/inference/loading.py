"""Loading a trained model for inference, the one loader: chat, serve, eval-tools, the demo and the generation
backends' `from_pretrained` all come through here. A missing or broken directory or adapter is a UserError."""
from __future__ import annotations

import torch

from minimind_scale.errors import UserError
from minimind_scale.models.build import load_tokenizer
from minimind_scale.models.model_dir import check_model_dir
from minimind_scale.models.yarn import DEFAULT_ORIGINAL_POSITIONS, load_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a `--dtype` value; auto is bf16 on a GPU that supports it, else fp32."""
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[dtype]


def load_pretrained(auto_class, model_dir: str, dtype: torch.dtype, config=None):
    """`auto_class.from_pretrained(model_dir)` (with `config` when given), a failure as a UserError naming it."""
    try:
        return auto_class.from_pretrained(model_dir, dtype=dtype, **({"config": config} if config is not None else {}))
    except (OSError, ValueError) as e:
        raise UserError(f"{model_dir}: the model failed to load ({type(e).__name__}: {e})") from None


def load_chat_model(model_dir: str, adapter: str | None = None, dtype: str = "auto", yarn_factor: float | None = None,
                    yarn_original_max_position_embeddings: int = DEFAULT_ORIGINAL_POSITIONS,
                    device: str | None = None):
    """(model, tokenizer) ready for generation, in eval mode on `device` (default: the GPU when there is one);
    `adapter` applies a LoRA on top, `yarn_factor` extends the context with YaRN (see models/yarn.py)."""
    from transformers import AutoModelForCausalLM

    check_model_dir(model_dir, "--model")
    if adapter is not None:
        check_model_dir(adapter, "--adapter", adapter=True)
    tokenizer = load_tokenizer(None, model_dir)
    config = load_config(model_dir, yarn_factor, yarn_original_max_position_embeddings)
    model = load_pretrained(AutoModelForCausalLM, model_dir, pick_dtype(dtype), config)
    if adapter is not None:
        model = _with_adapter(model, adapter, model_dir)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return model, tokenizer


def _with_adapter(model, adapter: str, model_dir: str):
    """`model` with the (already checked) LoRA adapter applied; an adapter of another shape is a UserError."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{adapter}: the adapter does not fit {model_dir} ({type(e).__name__}: {e})") from None
