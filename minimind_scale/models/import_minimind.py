"""import-minimind: a MiniMind `*.pth` state dict -> a Hugging Face model directory (Qwen3 / Qwen3-MoE).

MiniMind's key names are Qwen3's (model.layers.N.self_attn.q_proj, ...), so a dense checkpoint only
needs its config inferred from the shapes. MoE checkpoints hold one set of SwiGLU weights per expert,
while transformers' Qwen3MoeForCausalLM holds them fused: gate_up_proj [E, 2·inter, hidden] (each
expert's gate rows, then its up rows) and down_proj [E, hidden, inter].
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from pydantic import Field

from minimind_scale.config import StrictConfig
from minimind_scale.errors import UserError

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
# Wrappers MiniMind-era training scripts leave in front of the names (DDP, torch.compile).
STRIPPED_PREFIXES = ("module.", "_orig_mod.")


class ImportMinimindConfig(StrictConfig):
    """Convert a MiniMind checkpoint (plain torch.save of the state dict, fp16 or fp32) into a model
    directory that every stage accepts as --model and AutoModelForCausalLM loads with no custom code.
    The architecture (width, layers, heads, KV heads, head_dim, SwiGLU width, experts) is read from
    the tensor shapes."""

    weights: str = Field(..., description="the MiniMind .pth file")
    out_dir: str = Field(..., description="where the Hugging Face model directory is written")
    tokenizer: str | None = Field(None, description="tokenizer directory (default: the shipped one, if its vocabulary "
                                                    "matches the embedding)")
    moe: bool = Field(False, description="require a MoE checkpoint (experts are detected from the shapes either way)")


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors come in many types
        raise UserError(f"{path}: not a torch.save'd state dict ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # a resume checkpoint that also holds optimizer state
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise UserError(f"{path}: expected a dict of parameter name -> tensor")
    out = {}
    for k, v in sd.items():
        for prefix in STRIPPED_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _shape(sd: dict, key: str, path: str) -> tuple[int, ...]:
    if key not in sd:
        raise UserError(f"{path}: key '{key}' is missing: not a MiniMind state dict")
    return tuple(sd[key].shape)


def infer_config(sd: dict[str, torch.Tensor], path: str) -> dict:
    """Every architecture number from the shapes, checked for consistency with the MiniMind layout."""
    emb = _shape(sd, "model.embed_tokens.weight", path)
    if len(emb) != 2:
        raise UserError(f"{path}: 'model.embed_tokens.weight' has shape {list(emb)}, expected [vocab, hidden]")
    vocab, hidden = emb
    layer_ids = sorted({int(m.group(1)) for k in sd if (m := LAYER_KEY.match(k))})
    if not layer_ids:
        raise UserError(f"{path}: no 'model.layers.N.*' keys: not a MiniMind state dict")
    if layer_ids != list(range(len(layer_ids))):
        missing = min(set(range(max(layer_ids) + 1)) - set(layer_ids))
        raise UserError(f"{path}: layer {missing} is missing (keys 'model.layers.{missing}.*')")
    attn = "model.layers.0.self_attn."
    head_dim = _shape(sd, attn + "q_norm.weight", path)[0]
    q_rows = _shape(sd, attn + "q_proj.weight", path)[0]
    k_rows = _shape(sd, attn + "k_proj.weight", path)[0]
    for key, rows in ((attn + "q_proj.weight", q_rows), (attn + "k_proj.weight", k_rows)):
        if rows % head_dim:
            raise UserError(f"{path}: '{key}' has {rows} rows, not a multiple of head_dim {head_dim} (the q_norm size)")
    heads, kv_heads = q_rows // head_dim, k_rows // head_dim
    if heads % kv_heads:
        raise UserError(f"{path}: {heads} query heads cannot share {kv_heads} KV heads ('{attn}k_proj.weight')")
    experts = sd["model.layers.0.mlp.gate.weight"].shape[0] if "model.layers.0.mlp.gate.weight" in sd else 0
    mlp = "model.layers.0.mlp.experts.0." if experts else "model.layers.0.mlp."
    inter = _shape(sd, mlp + "gate_proj.weight", path)[0]
    return dict(vocab=vocab, hidden=hidden, layers=len(layer_ids), head_dim=head_dim, heads=heads,
                kv_heads=kv_heads, inter=inter, experts=experts)


def expected_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """The complete MiniMind key layout for an inferred config (lm_head excluded: it is tied)."""
    h, d = c["hidden"], c["head_dim"]
    shapes = {"model.embed_tokens.weight": (c["vocab"], h), "model.norm.weight": (h,)}
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (c["heads"] * d, h),
            p + "self_attn.k_proj.weight": (c["kv_heads"] * d, h),
            p + "self_attn.v_proj.weight": (c["kv_heads"] * d, h),
            p + "self_attn.o_proj.weight": (h, c["heads"] * d),
            p + "self_attn.q_norm.weight": (d,),
            p + "self_attn.k_norm.weight": (d,),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
        if c["experts"]:
            shapes[p + "mlp.gate.weight"] = (c["experts"], h)
            for e in range(c["experts"]):
                q = f"{p}mlp.experts.{e}."
                shapes.update({q + "gate_proj.weight": (c["inter"], h), q + "up_proj.weight": (c["inter"], h),
                               q + "down_proj.weight": (h, c["inter"])})
        else:
            shapes.update({p + "mlp.gate_proj.weight": (c["inter"], h), p + "mlp.up_proj.weight": (c["inter"], h),
                           p + "mlp.down_proj.weight": (h, c["inter"])})
    return shapes


def check_layout(sd: dict[str, torch.Tensor], c: dict, path: str) -> bool:
    """Raise naming the first missing, unexpected or mis-shaped key; return whether lm_head is tied."""
    shapes = expected_shapes(c)
    for key, shape in shapes.items():
        if key not in sd:
            raise UserError(f"{path}: key '{key}' is missing (expected shape {list(shape)} for the layout inferred "
                            f"from the other tensors: {_describe(c)})")
        if tuple(sd[key].shape) != shape:
            raise UserError(f"{path}: key '{key}' has shape {list(sd[key].shape)}, expected {list(shape)} for the "
                            f"layout inferred from the other tensors ({_describe(c)})")
        if not sd[key].is_floating_point():
            raise UserError(f"{path}: key '{key}' holds {sd[key].dtype}, not floating-point weights")
    # Rotary caches (freqs_cos / freqs_sin) are recomputed by transformers; anything else is unknown.
    extra = [k for k in sd if k not in shapes and k != "lm_head.weight" and not k.split(".")[-1].startswith("freqs_")]
    if extra:
        raise UserError(f"{path}: unexpected key '{extra[0]}' (shape {list(sd[extra[0]].shape)}) in a MiniMind "
                        f"{'MoE' if c['experts'] else 'dense'} layout"
                        + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    if "lm_head.weight" not in sd:
        return True
    head = sd["lm_head.weight"]
    if tuple(head.shape) != shapes["model.embed_tokens.weight"]:
        raise UserError(f"{path}: key 'lm_head.weight' has shape {list(head.shape)}, expected "
                        f"{list(shapes['model.embed_tokens.weight'])}")
    return torch.equal(head, sd["model.embed_tokens.weight"])


def _describe(c: dict) -> str:
    moe = f", {c['experts']} experts" if c["experts"] else ""
    return (f"hidden {c['hidden']}, {c['layers']} layers, {c['heads']} heads / {c['kv_heads']} KV heads of "
            f"{c['head_dim']}, intermediate {c['inter']}, vocab {c['vocab']}{moe}")


def to_transformers(sd: dict[str, torch.Tensor], c: dict) -> dict[str, torch.Tensor]:
    """Qwen3MoeForCausalLM's names: per-expert SwiGLU weights fused; dense checkpoints pass through."""
    if not c["experts"]:
        return {k: v for k, v in sd.items() if k in expected_shapes(c) or k == "lm_head.weight"}
    out = {}
    for k, v in sd.items():
        if ".mlp.experts." not in k and not k.split(".")[-1].startswith("freqs_"):
            out[k] = v
    for i in range(c["layers"]):
        p = f"model.layers.{i}.mlp.experts."
        E = range(c["experts"])
        out[p + "gate_up_proj"] = torch.stack(
            [torch.cat([sd[f"{p}{e}.gate_proj.weight"], sd[f"{p}{e}.up_proj.weight"]], 0) for e in E])
        out[p + "down_proj"] = torch.stack([sd[f"{p}{e}.down_proj.weight"] for e in E])
    return out


def build_hf_config(c: dict, tokenizer, tied: bool, dtype: torch.dtype):
    from transformers import Qwen3Config, Qwen3MoeConfig

    common = dict(vocab_size=c["vocab"], hidden_size=c["hidden"], num_hidden_layers=c["layers"],
                  num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"], head_dim=c["head_dim"],
                  intermediate_size=c["inter"], max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=tied,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, dtype=dtype)
    if c["experts"]:
        # The same MoE settings as the minimind3-moe preset, so training an imported model behaves alike.
        cfg = Qwen3MoeConfig(**common, moe_intermediate_size=c["inter"], num_experts=c["experts"],
                             num_experts_per_tok=1, norm_topk_prob=True, router_aux_loss_coef=5e-4,
                             output_router_logits=True, decoder_sparse_step=1, mlp_only_layers=[])
    else:
        cfg = Qwen3Config(**common)
    cfg.head_dim = c["head_dim"]  # Qwen3's configs fall back to 128 otherwise
    return cfg


def choose_tokenizer(path: str | None, vocab: int):
    from minimind_scale.models.build import DEFAULT_TOKENIZER, load_tokenizer

    tok = load_tokenizer(path)
    if path is None and len(tok) != vocab:
        raise UserError(f"the embedding has {vocab} rows but the shipped tokenizer ({DEFAULT_TOKENIZER}) has "
                        f"{len(tok)} tokens: pass --tokenizer DIR with the tokenizer these weights were trained with "
                        "(MiniMind's own, 6400 tokens, for MiniMind releases)")
    if len(tok) > vocab:
        raise UserError(f"tokenizer {path} has {len(tok)} tokens but the embedding only {vocab} rows")
    return tok


def run(cfg: ImportMinimindConfig) -> Path:
    from transformers import AutoModelForCausalLM

    from minimind_scale.models.build import save_hf

    sd = load_state_dict(cfg.weights)
    c = infer_config(sd, cfg.weights)
    if cfg.moe and not c["experts"]:
        raise UserError(f"{cfg.weights}: --moe given but the weights are dense "
                        "(no 'model.layers.0.mlp.gate.weight' router)")
    tied = check_layout(sd, c, cfg.weights)
    tokenizer = choose_tokenizer(cfg.tokenizer, c["vocab"])
    dtypes = {v.dtype for k, v in sd.items() if not k.split(".")[-1].startswith("freqs_")}
    # Keep the file's precision (MiniMind ships fp16); mixed files become fp32 rather than lose bits.
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    hf_cfg = build_hf_config(c, tokenizer, tied, dtype)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    weights = to_transformers(sd, c)
    if tied:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False)
    # Anything left here is a bug in this converter, not in the user's file.
    assert not missing and not unexpected, (missing, unexpected)
    if tied:
        model.tie_weights()
    out = Path(cfg.out_dir)
    save_hf(model, tokenizer, out)
    kind = f"Qwen3-MoE ({c['experts']} experts, top-1)" if c["experts"] else "Qwen3"
    print(f"{cfg.weights}: {_describe(c)}, {str(dtype).replace('torch.', '')} -> {kind} model in {out}")
    return out
