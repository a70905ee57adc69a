"""A transformers Qwen3 / Qwen3-MoE model as llama.cpp sees it: its architecture, hyperparameters and tensors.

Names come from the gguf package's own maps (llama.cpp's), so a tensor llama.cpp would not recognise is an
error here rather than a file that fails to load. What llama.cpp's graph cannot compute the same way is refused
before anything is written.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import gguf
import numpy as np
import torch

from minimind_scale.errors import UserError

# transformers class -> llama.cpp architecture
ARCHITECTURES = {"Qwen3ForCausalLM": gguf.MODEL_ARCH.QWEN3, "Qwen3MoeForCausalLM": gguf.MODEL_ARCH.QWEN3MOE}


def gguf_architecture(model) -> gguf.MODEL_ARCH:
    """The llama.cpp architecture of `model`, or a UserError saying why it cannot be exported as it is."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise UserError(f"export --format gguf: {name} is not supported; it writes {' and '.join(ARCHITECTURES)} "
                        "(the causal LMs every stage trains). A reward model or a critic has no GGUF form here")
    config = model.config
    rope = dict(getattr(config, "rope_parameters", None) or {})
    problems = []
    if rope.get("rope_type", "default") not in ("default", "yarn"):
        problems.append(f"RoPE type '{rope.get('rope_type')}' (llama.cpp's qwen3 takes default or yarn here)")
    if arch_is_moe(model):
        # llama.cpp's qwen3moe graph renormalises the top-k routing weights and puts experts in every layer.
        if not getattr(config, "norm_topk_prob", True):
            problems.append("norm_topk_prob false (llama.cpp's qwen3moe always renormalises the top-k weights)")
        if list(getattr(config, "mlp_only_layers", []) or []) or getattr(config, "decoder_sparse_step", 1) != 1:
            problems.append("dense layers among the MoE ones (mlp_only_layers / decoder_sparse_step)")
    if problems:
        raise UserError(f"export --format gguf: this {name} cannot be computed the same way by llama.cpp: "
                        + "; ".join(problems))
    return ARCHITECTURES[name]


def arch_is_moe(model) -> bool:
    return type(model).__name__ == "Qwen3MoeForCausalLM"


def add_hyperparameters(writer: gguf.GGUFWriter, config) -> None:
    """The keys llama.cpp's qwen3 / qwen3moe loaders read, from the transformers config."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = dict(config.rope_parameters or {})
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(float(rope[key]))
        # llama.cpp always scales cos/sin by YaRN's 0.1 ln(factor) + 1 (transformers' default attention_factor);
        # its rope attn_factor multiplies that, so the ratio gives transformers' own factor (MiniMind's is 1).
        usual = 0.1 * math.log(float(rope["factor"])) + 1.0
        attention = rope.get("attention_factor")
        writer.add_rope_scaling_attn_factors((usual if attention is None else float(attention)) / usual)
    if getattr(config, "num_experts", None):
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)


def named_tensors(model, arch: gguf.MODEL_ARCH) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array) for every weight llama.cpp loads, in the transformers order.

    A tied lm_head is left out: llama.cpp reads the output projection from token_embd when `output` is absent.
    Fused MoE experts ([experts, 2*ffn, hidden] gate_up, [experts, hidden, ffn] down) become llama.cpp's three
    stacked expert tensors; the reversed dimension order of GGUF then gives the shapes its loader expects.
    """
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        for part_name, part in split_experts(hf_name, tensor.detach().to(torch.float32)):
            gguf_name = names.get_name(part_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UserError(f"export --format gguf: the tensor '{part_name}' has no llama.cpp name for "
                                f"{arch.name.lower()}; this model's layout is not the one the exporter knows")
            yield gguf_name, part.contiguous().numpy()


def split_experts(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers' fused expert tensors as the per-projection stacks llama.cpp's name map knows."""
    if name.endswith("mlp.experts.gate_up_proj"):
        if tensor.ndim != 3 or tensor.shape[1] % 2:
            raise UserError(f"export --format gguf: '{name}' has shape {tuple(tensor.shape)}, not "
                            "[experts, 2*ffn, hidden]")
        gate, up = tensor.chunk(2, dim=1)
        stem = name.removesuffix("gate_up_proj")
        yield stem + "gate_proj.weight", gate
        yield stem + "up_proj.weight", up
    elif name.endswith("mlp.experts.down_proj"):
        yield name + ".weight", tensor
    else:
        yield name, tensor
