"""MiniMind's model sizes on transformers' Qwen3 classes, tokenizer loading, and saving in HF format."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoTokenizer

from minimind_scale.errors import UserError
from minimind_scale.models.model_dir import check_model_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Qwen3Config, Qwen3MoeConfig

# The model classes are imported where they are used: importing them pulls in transformers' modeling code
# (about a second), which commands that only tokenise (`prepare`) never need.

DEFAULT_TOKENIZER = Path(__file__).parents[1] / "assets" / "tokenizer"

# hidden, layers, KV heads, MoE experts (0 = dense). Query heads are 8 and head_dim = hidden / 8.
PRESETS: dict[str, dict] = {
    "minimind3": dict(hidden=768, layers=8, kv_heads=4, experts=0),
    "minimind3-moe": dict(hidden=768, layers=8, kv_heads=4, experts=4),
    "minimind2-small": dict(hidden=512, layers=8, kv_heads=2, experts=0),
    "minimind2": dict(hidden=768, layers=16, kv_heads=2, experts=0),
    "tiny": dict(hidden=64, layers=2, kv_heads=2, experts=0),
}
QUERY_HEADS = 8


def minimind_intermediate_size(hidden: int) -> int:
    """MiniMind's SwiGLU width: hidden·π rounded up to a multiple of 64."""
    return math.ceil(hidden * math.pi / 64) * 64


def preset_config(name: str, vocab_size: int, tokenizer: PreTrainedTokenizerBase, hidden: int | None = None,
                  layers: int | None = None) -> Qwen3Config | Qwen3MoeConfig:
    from transformers import Qwen3Config, Qwen3MoeConfig

    p = dict(PRESETS[name])
    hidden = hidden or p["hidden"]
    if hidden % QUERY_HEADS:
        raise UserError(f"hidden_size {hidden} must be a multiple of {QUERY_HEADS} (the query head count)")
    if QUERY_HEADS % p["kv_heads"]:
        raise UserError(f"{QUERY_HEADS} query heads cannot be shared among {p['kv_heads']} KV heads")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers or p["layers"],
        num_attention_heads=QUERY_HEADS,
        num_key_value_heads=p["kv_heads"],
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    inter = minimind_intermediate_size(hidden)
    if p["experts"]:
        cfg = Qwen3MoeConfig(**common, intermediate_size=inter, moe_intermediate_size=inter,
                             num_experts=p["experts"], num_experts_per_tok=1, norm_topk_prob=True,
                             router_aux_loss_coef=5e-4, output_router_logits=True)
    else:
        cfg = Qwen3Config(**common, intermediate_size=inter)
    # Qwen3's default head_dim is 128 whatever the width; MiniMind's is hidden / heads.
    cfg.head_dim = hidden // QUERY_HEADS
    return cfg


def load_tokenizer(path: str | None, model: str | None = None) -> PreTrainedTokenizerBase:
    """The given tokenizer, else the starting model's own, else the one shipped with the package."""
    if path is None and model is not None and (Path(model) / "tokenizer_config.json").is_file():
        path = model
    path = path or str(DEFAULT_TOKENIZER)
    if not Path(path).is_dir():
        raise UserError(f"tokenizer directory not found: {path}")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types for a broken directory
        raise UserError(f"{path}: not a tokenizer directory ({type(e).__name__}: {e})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise UserError(f"{path}: the tokenizer has no chat template")
    return tok


def is_model_dir(model: str) -> bool:
    return (Path(model) / "config.json").is_file()


def check_model_source(model: str, hidden_size: int | None = None, num_hidden_layers: int | None = None) -> None:
    """Fail before any data work when --model names nothing usable."""
    if model in PRESETS:
        return
    if Path(model).is_dir():
        check_model_dir(model, "--model")
    else:
        from minimind_scale.config import did_you_mean

        raise UserError(f"model '{model}' is neither a preset{did_you_mean(model, PRESETS)} ({', '.join(PRESETS)}) "
                        "nor a directory with config.json")
    if hidden_size or num_hidden_layers:
        raise UserError("hidden_size / num_hidden_layers only apply when starting from a preset, "
                        "not from a model directory")


def build_model(model: str, tokenizer: PreTrainedTokenizerBase, hidden_size: int | None = None,
                num_hidden_layers: int | None = None) -> PreTrainedModel:
    """A fresh model from a preset (vocab follows the tokenizer) or a pretrained HF directory."""
    from transformers import AutoModelForCausalLM

    if model in PRESETS:
        cfg = preset_config(model, len(tokenizer), tokenizer, hidden_size, num_hidden_layers)
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    check_model_source(model, hidden_size, num_hidden_layers)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    if m.get_input_embeddings().num_embeddings < len(tokenizer):
        raise UserError(f"{model}: its vocabulary ({m.get_input_embeddings().num_embeddings}) is smaller than "
                        f"the tokenizer's ({len(tokenizer)})")
    return m


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all, trainable), counting tied weights once."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def save_hf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, state_dict=None) -> None:
    """Write a directory that `AutoModelForCausalLM.from_pretrained` loads with no custom code."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out)
    gen = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.85, top_p=0.85,
                           max_new_tokens=512)
    gen.save_pretrained(out)
