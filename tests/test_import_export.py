"""import-minimind (MiniMind .pth -> HF) and export (training checkpoint -> HF), checked against an
independent plain-torch MiniMind forward written from MiniMind's published architecture (see
`reference_logits`)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import DEMO, REPO, run_cli
from conftest import cli_in_process as cli

HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, EXPERTS = 64, 2, 8, 2, 96, 4
HEAD_DIM = HIDDEN // HEADS
SHIPPED_VOCAB = 1024  # minimind_scale/assets/tokenizer
TINY = ["--model", "tiny", "--max_seq_len", "96", "--dtype", "fp32", "--log_interval", "1", "--num_proc", "1",
        "--learning_rate", "3e-3", "--seed", "5", "--batch_size", "4"]


# ----------------------------------------------------------------------------- reference MiniMind


def rms_norm(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def swiglu(x, gate, up, down):
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def reference_logits(sd: dict, ids: torch.Tensor, theta: float = 1e6) -> torch.Tensor:
    """MiniMind's decoder: pre-norm blocks of GQA attention (q/k RMSNorm over head_dim, rotate-half RoPE)
    and a SwiGLU MLP or a top-1 MoE of SwiGLU experts; final RMSNorm; lm_head tied to the embedding."""
    sd = {k: v.float() for k, v in sd.items()}
    emb = sd["model.embed_tokens.weight"]
    n_layers = len({k.split(".")[2] for k in sd if k.startswith("model.layers.")})
    d = sd["model.layers.0.self_attn.q_norm.weight"].shape[0]
    B, T = ids.shape
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos().float(), torch.cat([angles, angles], -1).sin().float()
    causal = torch.full((T, T), float("-inf")).triu(1)
    x = emb[ids]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        h = rms_norm(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(B, T, -1, d)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(B, T, -1, d)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(B, T, -1, d)
        q = rms_norm(q, sd[p + "self_attn.q_norm.weight"]).transpose(1, 2)
        k = rms_norm(k, sd[p + "self_attn.k_norm.weight"]).transpose(1, 2)
        v = v.transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + causal, dim=-1)
        x = x + (att @ v).transpose(1, 2).reshape(B, T, -1) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, sd[p + "post_attention_layernorm.weight"])
        if p + "mlp.gate.weight" in sd:
            probs = torch.softmax(h @ sd[p + "mlp.gate.weight"].T, dim=-1)
            top_p, top_i = probs.max(dim=-1, keepdim=True)
            weight = top_p / top_p.sum(-1, keepdim=True)  # normalised top-1 weight
            out = torch.zeros_like(h)
            for e in range(probs.shape[-1]):
                q_ = f"{p}mlp.experts.{e}."
                y = swiglu(h, sd[q_ + "gate_proj.weight"], sd[q_ + "up_proj.weight"], sd[q_ + "down_proj.weight"])
                out = out + torch.where(top_i == e, weight, 0.0) * y
            x = x + out
        else:
            x = x + swiglu(h, sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"],
                           sd[p + "mlp.down_proj.weight"])
    return rms_norm(x, sd["model.norm.weight"]) @ emb.T


def minimind_state_dict(moe: bool, dtype: torch.dtype, vocab: int = SHIPPED_VOCAB, seed: int = 0) -> dict:
    """Random weights in MiniMind's key layout (the same names as Qwen3's), lm_head tied to the embedding
    as MiniMind saves it."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, std=0.1: torch.randn(*shape, generator=g) * std  # noqa: E731
    gain = lambda n: 1 + r(n)  # noqa: E731
    # Logits of order 1, so the 1e-5 bound measures the layout, not fp32 rounding of large values.
    sd = {"model.embed_tokens.weight": r(vocab, HIDDEN, std=0.15), "model.norm.weight": gain(HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd.update({
            p + "self_attn.q_proj.weight": r(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": r(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": r(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": r(HIDDEN, HEADS * HEAD_DIM),
            p + "self_attn.q_norm.weight": gain(HEAD_DIM),
            p + "self_attn.k_norm.weight": gain(HEAD_DIM),
            p + "input_layernorm.weight": gain(HIDDEN),
            p + "post_attention_layernorm.weight": gain(HIDDEN),
        })
        mlps = [f"{p}mlp.experts.{e}." for e in range(EXPERTS)] if moe else [p + "mlp."]
        if moe:
            sd[p + "mlp.gate.weight"] = r(EXPERTS, HIDDEN, std=1.0)  # large, so tokens spread over experts
        for q in mlps:
            sd.update({q + "gate_proj.weight": r(INTER, HIDDEN), q + "up_proj.weight": r(INTER, HIDDEN),
                       q + "down_proj.weight": r(HIDDEN, INTER)})
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return {k: v.to(dtype) for k, v in sd.items()}


def hf_logits(model_dir, ids) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits




def ok(args: list[str], capsys) -> None:
    code, err = cli(args, capsys)
    assert code == 0, err


IDS = torch.randint(3, SHIPPED_VOCAB, (2, 23), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- import-minimind


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_import_minimind_matches_reference(moe, dtype, tmp_path, data_cache, capsys):
    sd = minimind_state_dict(moe, dtype)
    torch.save(sd, tmp_path / "w.pth")
    out = tmp_path / "hf"
    ok(["import-minimind", "--weights", str(tmp_path / "w.pth"), "--out_dir", str(out),
             *(["--moe"] if moe else [])], capsys)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"], config["vocab_size"]) == (
        HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, SHIPPED_VOCAB)
    assert config["tie_word_embeddings"] is True
    if moe:
        assert (config.get("num_experts", config.get("num_local_experts")), config["num_experts_per_tok"],
                config["moe_intermediate_size"]) == (EXPERTS, 1, INTER)
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # the file's precision is kept
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32" if dtype == torch.float32 else "F16"}
    ref = reference_logits(sd, IDS)
    got = hf_logits(out, IDS)
    assert ref.abs().max() > 0.5 and (got - ref).abs().max() < 1e-5, (got - ref).abs().max()
    if moe:  # the router really sends tokens to different experts, so the fused layout is exercised
        h = sd["model.embed_tokens.weight"].float()[IDS]
        assert len(set((h @ sd["model.layers.0.mlp.gate.weight"].float().T).argmax(-1).flatten().tolist())) > 1


def test_import_minimind_rejects_bad_layouts(tmp_path, data_cache, capsys):
    sd = minimind_state_dict(False, torch.float32)
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(3 * HEAD_DIM, HIDDEN)
    torch.save(sd, tmp_path / "bad.pth")
    code, err = cli(["import-minimind", "--weights", str(tmp_path / "bad.pth"), "--out_dir", str(tmp_path / "o")],
                    capsys)
    assert code == 2 and "Traceback" not in err, err
    assert "model.layers.1.self_attn.k_proj.weight" in err and "[24, 64]" in err

    sd = minimind_state_dict(True, torch.float16, vocab=SHIPPED_VOCAB + 64)
    del sd["model.layers.1.mlp.experts.2.up_proj.weight"]
    torch.save(sd, tmp_path / "missing.pth")
    code, err = cli(["import-minimind", "--weights", str(tmp_path / "missing.pth"), "--out_dir", str(tmp_path / "o")],
                    capsys)
    assert code == 2 and "model.layers.1.mlp.experts.2.up_proj.weight" in err, err

    # The vocabulary is not the shipped tokenizer's: a tokenizer must be named.
    sd = minimind_state_dict(False, torch.float16, vocab=SHIPPED_VOCAB + 64)
    torch.save(sd, tmp_path / "vocab.pth")
    code, err = cli(["import-minimind", "--weights", str(tmp_path / "vocab.pth"), "--out_dir", str(tmp_path / "o"),
                    "--moe"], capsys)
    assert code == 2 and "--moe" in err, err
    code, err = cli(["import-minimind", "--weights", str(tmp_path / "vocab.pth"), "--out_dir", str(tmp_path / "o")],
                    capsys)
    assert code == 2 and "--tokenizer" in err and str(SHIPPED_VOCAB + 64) in err, err
    # A named tokenizer may be smaller than the embedding (MiniMind-style padded vocabularies).
    ok(["import-minimind", "--weights", str(tmp_path / "vocab.pth"), "--out_dir", str(tmp_path / "o"),
        "--tokenizer", str(REPO / "minimind_scale" / "assets" / "tokenizer")], capsys)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["vocab_size"] == SHIPPED_VOCAB + 64


# ----------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def small_sft(tmp_path_factory):
    """64 demo conversations: tokenising the whole demo set would dominate these tests' time."""
    path = tmp_path_factory.mktemp("data") / "sft64.jsonl"
    path.write_text("".join((DEMO / "sft.jsonl").read_text().splitlines(keepends=True)[:64]))
    return path


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, data_cache, small_sft):
    out = tmp_path_factory.mktemp("sft") / "run"
    run_cli(["sft", "--data_path", str(small_sft), "--max_steps", "4", "--save_interval", "2",
             "--save_total_limit", "3", "--out_dir", str(out), *TINY], data_cache)
    return out


def test_export_plain_checkpoint(sft_run, tmp_path, data_cache, capsys):
    ckpt = sft_run / "checkpoints" / "step_2"
    out = tmp_path / "exported"
    ok(["export", "--checkpoint", str(ckpt), "--out_dir", str(out)], capsys)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (out / name).is_file(), name
    weights = load_file(str(ckpt / "model.safetensors"))
    assert "lm_head.weight" not in weights  # save_state drops the tied head; export re-ties it
    got = hf_logits(out, IDS)
    assert (got - reference_logits(weights, IDS)).abs().max() < 1e-5
    # step_2 is not the end of training: its weights differ from final/
    assert (got - hf_logits(sft_run / "final", IDS)).abs().max() > 1e-4

    bf16 = tmp_path / "bf16"
    ok(["export", "--checkpoint", str(ckpt), "--out_dir", str(bf16), "--dtype", "bf16"], capsys)
    with safe_open(str(bf16 / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model = AutoModelForCausalLM.from_pretrained(bf16)
    assert model.dtype == torch.bfloat16

    code, err = cli(["export", "--checkpoint", str(sft_run), "--out_dir", str(tmp_path / "x")], capsys)
    assert code == 2 and "not a training checkpoint" in err and "Traceback" not in err


def test_export_zero2_checkpoint_matches_final(tmp_path, data_cache, small_sft, capsys):
    out = tmp_path / "run"
    run_cli(["sft", "--data_path", str(small_sft), "--max_steps", "2", "--out_dir", str(out),
             "--deepspeed", str(REPO / "ds_configs" / "zero2.json"), *TINY], data_cache, nproc=2)
    ckpt = out / "checkpoints" / "step_2"
    assert (ckpt / "latest").is_file()  # a ZeRO checkpoint, not a plain state dict
    ok(["export", "--checkpoint", str(ckpt), "--out_dir", str(tmp_path / "exported")], capsys)
    got, final = hf_logits(tmp_path / "exported", IDS), hf_logits(out / "final", IDS)
    assert (got - final).abs().max() < 1e-5
    # --format gguf reads ZeRO shards the same way: the same tensors as the file of the final directory.
    import gguf

    files = {"ckpt": ["--checkpoint", str(ckpt)], "final": ["--model", str(out / "final")]}
    for name, source in files.items():
        (tmp_path / name).mkdir()
        ok(["export", *source, "--format", "gguf", "--out_file", str(tmp_path / name / "m.gguf"), "--gguf_type",
            "f32"], capsys)
    tensors = [{t.name: t.data.tobytes() for t in gguf.GGUFReader(tmp_path / name / "m.gguf").tensors}
               for name in files]
    assert tensors[0] == tensors[1] and "token_embd.weight" in tensors[0]


def test_export_merges_lora(sft_run, tmp_path, data_cache, small_sft, capsys):
    out = tmp_path / "lora"
    run_cli(["lora", "--data_path", str(small_sft), "--model", str(sft_run / "final"), "--max_steps", "2",
             "--merge_lora", "true", "--lora_rank", "4", "--out_dir", str(out),
             *[a for a in TINY if a not in ("--model", "tiny")]], data_cache)
    assert yaml.safe_load((out / "config.yaml").read_text())["lora_rank"] == 4
    ckpt = out / "checkpoints" / "step_2"
    ok(["export", "--checkpoint", str(ckpt), "--out_dir", str(tmp_path / "merged"), "--merge_lora"], capsys)
    got = hf_logits(tmp_path / "merged", IDS)
    assert (got - hf_logits(out / "final" / "merged", IDS)).abs().max() < 1e-5
    assert (got - hf_logits(sft_run / "final", IDS)).abs().max() > 1e-6  # the adapter changed something
