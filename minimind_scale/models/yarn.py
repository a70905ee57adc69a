"""YaRN context extension at inference: the `--yarn_factor` options of chat, serve, eval and export.

MiniMind extends its context after training with YaRN (factor 16 over the 2048 positions it was
trained on, beta_fast 32, beta_slow 1). transformers implements the same rotary scaling as the rope
type "yarn" of `config.rope_parameters`, so the options only rewrite the loaded (or exported) config
and the model needs no code of its own: a directory exported with them loads with YaRN anywhere.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

from minimind_scale.errors import UserError

DEFAULT_ORIGINAL_POSITIONS = 2048  # MiniMind's pretraining length

YarnFactor = Annotated[float | None, Field(
    ge=1, description="extend the context with YaRN by this factor (MiniMind uses 16); the model then reads "
                      "factor x yarn_original_max_position_embeddings positions. Default: the model's own RoPE")]
YarnOriginalPositions = Annotated[int, Field(
    ge=1, description="with --yarn_factor: the context length the model was trained on")]


def yarn_parameters(factor: float, original: int, rope_theta: float) -> dict:
    """transformers' `rope_parameters` for MiniMind's YaRN."""
    return {"rope_type": "yarn", "rope_theta": rope_theta, "factor": float(factor),
            "original_max_position_embeddings": int(original), "beta_fast": 32.0, "beta_slow": 1.0,
            # MiniMind leaves cos/sin unscaled; transformers would otherwise default to 0.1 ln(factor) + 1.
            "attention_factor": 1.0}


def apply_yarn(config, factor: float | None, original: int = DEFAULT_ORIGINAL_POSITIONS):
    """Set YaRN in a transformers config in place (its text config, for composite ones) and return it;
    `factor` None leaves the config as it is. rope_theta is kept, and max_position_embeddings becomes
    factor x original, the length YaRN scales to (transformers checks the two agree)."""
    if factor is None:
        return config
    text = config.get_text_config()
    current = dict(getattr(text, "rope_parameters", None) or {})
    theta = current.get("rope_theta", getattr(text, "rope_theta", None))
    if theta is None:
        raise UserError(f"{type(config).__name__} has no rope_theta: YaRN applies only to models with rotary "
                        "position embeddings")
    text.rope_parameters = yarn_parameters(factor, original, float(theta))
    text.max_position_embeddings = int(factor * original)
    text.validate_rope()
    return config


def load_config(model_dir: str, factor: float | None, original: int = DEFAULT_ORIGINAL_POSITIONS):
    """The AutoConfig of `model_dir` with YaRN applied, or None without `factor` (load the saved config)."""
    if factor is None:
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"{model_dir}: the model's config failed to load ({type(e).__name__}: {e})") from None
    return apply_yarn(config, factor, original)
