"""`export --format gguf`, run in llama.cpp itself (llama-cpp-python's build of it), against transformers.

A dense and an MoE model (hidden 64, 2 layers, MiniMind's tokenizer) are trained by `full_sft` on shared
conversations until they reproduce them with peaked next-token distributions (no argmax ties for numerics to
break), then:
- token ids: llama.cpp's tokenisation of 200 shared records (Chinese, English, tool calls, think tags, numbers)
  equals transformers';
- greedy generation: the f32 file continues 20 prompts for 32 tokens exactly as transformers does (>= 18 of 20);
  f16, bf16, q8_0 and q4_k_m report their agreement and mean log-prob gap;
- the chat template inside the file is the tokenizer's own, character for character; the Modelfile's stop
  tokens and markup are the tokenizer's, and its TEMPLATE, executed by Go's text/template, renders
  conversations as the tokenizer's template does;
- checkpoints (LoRA merged) and YaRN export as a model directory does; bad requests exit 2.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED, cli_output_in_process, needs_shared, run_cli
from gguf_helpers import (
    agreement,
    close_all,
    greedy_prompts,
    hf_logprobs,
    hf_reference,
    llama,
    llama_ids,
    llama_logprobs,
    read_jsonl,
    write_training_conversations,
)

pytestmark = [needs_shared]
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the [gguf] extra) is not installed")

TOKENIZER = SHARED / "tokenizers" / "minimind"
PRESETS = {"dense": "tiny", "moe": "minimind3-moe"}
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")


@pytest.fixture(scope="module", autouse=True)
def _close_llama_models():
    yield
    close_all()


def export(args: list[str], capsys) -> tuple[int, str, str]:
    return cli_output_in_process(["export", *args], capsys)


def export_ok(args: list[str]) -> None:
    """`export ARGS` through the real entry point, in this process (a module fixture has no capsys)."""
    from minimind_scale.cli import main

    try:
        main(["export", *args])
    except SystemExit as e:
        assert e.code == 0, f"export {' '.join(args)} exited {e.code}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache) -> dict[str, Path]:
    """{"dense": run dir, "moe": run dir}: 200 full_sft steps each on 32 shared conversations (16 English, 16
    Chinese; about 35 s apiece), enough to reproduce them with peaked next-token distributions; a checkpoint at
    the end."""
    root = tmp_path_factory.mktemp("gguf_runs")
    data = write_training_conversations(root / "conversations.jsonl")
    runs = {}
    for kind, preset in PRESETS.items():
        runs[kind] = root / kind
        run_cli(["full_sft", "--model", preset, "--hidden_size", "64", "--num_hidden_layers", "2",
                 "--tokenizer", str(TOKENIZER), "--data_path", str(data), "--out_dir", str(runs[kind]),
                 "--max_steps", "200", "--batch_size", "4", "--max_seq_len", "128", "--packing", "false",
                 "--learning_rate", "1e-2", "--warmup_steps", "10", "--min_lr_ratio", "0.1", "--dtype", "fp32",
                 "--num_proc", "1", "--seed", "0", "--save_interval", "200", "--log_interval", "100"], data_cache)
    return runs


@pytest.fixture(scope="module")
def gguf_files(trained, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """{(kind, type): file} for both models and every --gguf_type, each in its own folder with its Modelfile."""
    root = tmp_path_factory.mktemp("gguf_files")
    files = {}
    for kind, run in trained.items():
        for gguf_type in TYPES:
            out = root / f"{kind}-{gguf_type}" / "model.gguf"
            out.parent.mkdir()
            export_ok(["--model", str(run / "final"), "--format", "gguf", "--out_file", str(out), "--gguf_type",
                       gguf_type])
            files[kind, gguf_type] = out
    return files


@pytest.fixture(scope="module")
def hf_models(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = {kind: AutoModelForCausalLM.from_pretrained(run / "final").eval() for kind, run in trained.items()}
    return models, AutoTokenizer.from_pretrained(trained["dense"] / "final")


# ----------------------------------------------------------------------------- token ids

def token_test_texts(tokenizer) -> list[str]:
    """200 shared records as the model sees them: conversations through the chat template (tool declarations,
    tool calls and <think> blocks included), plain pretraining text, and numbers in every position."""
    from minimind_scale.chat.messages import normalize_messages
    from minimind_scale.chat.template import render_chat

    texts = []
    for name, count in (("sft_en_alpaca_demo.jsonl", 40), ("sft_zh_alpaca_demo.jsonl", 40),
                        ("sft_zh_toolcall_glaive.jsonl", 50)):
        for record in read_jsonl(name, count):
            messages, tools = normalize_messages(record)
            texts.append(render_chat(messages, tools, tokenizer))
    for record in read_jsonl("sft_identity.jsonl", 20):  # assistant turns with a thought inside <think>
        messages, tools = normalize_messages(record)
        messages[-1]["reasoning_content"] = f"The user said {messages[0]['content']!r}; 12345 + 2024 = 14369."
        texts.append(render_chat(messages, tools, tokenizer))
    for name in ("pretrain_en_c4wiki.jsonl", "pretrain_zh_poetry_8k.jsonl"):
        texts += [r["text"][:2000] for r in read_jsonl(name, 25)]
    assert len(texts) == 200
    return texts


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_llama_cpp_tokenises_200_shared_records_as_transformers(kind, gguf_files, hf_models):
    _, tokenizer = hf_models
    vocab = llama(gguf_files[kind, "f16"], vocab_only=True)
    texts = token_test_texts(tokenizer)
    mismatched = [t for t in texts if llama_ids(vocab, t) != tokenizer(t, add_special_tokens=False).input_ids]
    assert not mismatched, f"{len(mismatched)} of 200 differ, first: {mismatched[0][:300]!r}"
    # Multi-digit tokens are the pre-tokenizer's test: GPT-2's split keeps digit runs together.
    for number in (" 2024", "12345", "3.14159 and 1,000,000"):
        assert llama_ids(vocab, number) == tokenizer(number, add_special_tokens=False).input_ids, number


def test_the_qwen2_pre_tokenizer_would_split_numbers_wrongly(trained, hf_models, tmp_path, monkeypatch):
    """The negative control for the choice of "gpt-2": the "qwen2" type tokenises numbers differently."""
    from transformers import AutoModelForCausalLM

    from minimind_scale.export import gguf_vocab
    from minimind_scale.export.gguf_file import write_gguf

    _, tokenizer = hf_models
    monkeypatch.setattr(gguf_vocab, "pre_tokenizer_type", lambda tok: "qwen2")
    out = tmp_path / "qwen2.gguf"
    write_gguf(AutoModelForCausalLM.from_pretrained(trained["dense"] / "final"), tokenizer, out, "f16")
    vocab = llama(out, vocab_only=True)
    assert llama_ids(vocab, " 2024") != tokenizer(" 2024", add_special_tokens=False).input_ids


# ----------------------------------------------------------------------------- generation

@pytest.fixture(scope="module")
def agreement_table(gguf_files, hf_models) -> dict:
    """{(kind, type): agreement(...)}: 20 prompts x 32 greedy tokens for every exported file."""
    import torch

    torch.set_num_threads(1)
    models, tokenizer = hf_models
    prompts = greedy_prompts(tokenizer)
    reference = {kind: hf_reference(model, prompts, 32) for kind, model in models.items()}
    table = {}
    for (kind, gguf_type), path in gguf_files.items():
        table[kind, gguf_type] = agreement(reference[kind], llama(path), prompts)
    print("\nGGUF greedy agreement (20 prompts x 32 tokens) and mean |log-prob gap|:")
    for (kind, gguf_type), row in table.items():
        print(f"  {kind:5} {gguf_type:6} {row['agree']:2}/20  {row['mean_logprob_gap']:.5f}")
    return table


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_f32_gguf_generates_what_transformers_generates(kind, agreement_table):
    row = agreement_table[kind, "f32"]
    assert row["agree"] >= 18, row
    assert row["mean_logprob_gap"] < 1e-3, row


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_smaller_types_lose_precision_in_order(kind, agreement_table):
    """Every type runs; its log-prob gap grows as its precision shrinks (f32 < f16 < q8_0 < q4_k_m)."""
    gap = {t: agreement_table[kind, t]["mean_logprob_gap"] for t in TYPES}
    assert gap["f32"] < gap["f16"] < gap["q8_0"] < gap["q4_k_m"], gap
    assert gap["f16"] < 0.02 and gap["bf16"] < 0.1, gap
    assert agreement_table[kind, "f16"]["agree"] >= 14, agreement_table[kind, "f16"]


def test_model_trained_enough_to_have_no_argmax_ties(hf_models):
    """The agreement test is meaningful only where the top two logits are well apart."""
    import torch

    models, tokenizer = hf_models
    for model in models.values():
        for prompt in greedy_prompts(tokenizer)[:5]:
            top2 = torch.from_numpy(hf_logprobs(model, prompt)[-1]).topk(2).values
            assert float(top2[0] - top2[1]) > 1e-3


# ----------------------------------------------------------------------------- what the file carries

def gguf_fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def test_file_carries_the_tokenizers_chat_template_and_special_tokens(gguf_files, hf_models):
    _, tokenizer = hf_models
    fields = gguf_fields(gguf_files["moe", "q8_0"])
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["general.architecture"] == "qwen3moe" and fields["qwen3moe.expert_count"] == 4
    assert fields["general.name"] == "model"  # the file's own name, model.gguf
    assert gguf_fields(gguf_files["dense", "f16"])["general.architecture"] == "qwen3"
    # llama.cpp reads the template back and renders a conversation with it as transformers does.
    vocab = llama(gguf_files["dense", "f16"], vocab_only=True)
    assert vocab.metadata["tokenizer.chat_template"] == tokenizer.chat_template


def test_modelfile_stops_and_markup_are_the_tokenizers(gguf_files, hf_models):
    from minimind_scale.export.ollama import TEMPLATE, chatml_prompt

    _, tokenizer = hf_models
    text = (gguf_files["dense", "q4_k_m"].parent / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n")
    stops = [line.split('"')[1] for line in text.splitlines() if line.startswith("PARAMETER stop")]
    assert stops == ["<|im_end|>", "<|endoftext|>"]
    assert tokenizer.eos_token in stops
    for stop in stops:  # each stop is one special token that llama.cpp also treats as end of generation
        assert stop in tokenizer.all_special_tokens and len(tokenizer(stop, add_special_tokens=False).input_ids) == 1
    for marker in ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
                   "<tool_response>", "</tool_response>"):
        assert marker in TEMPLATE and len(tokenizer(marker, add_special_tokens=False).input_ids) == 1, marker
    assert "PARAMETER temperature 0.85" in text and "PARAMETER top_p 0.85" in text
    # The layout TEMPLATE spells out is the tokenizer's: conversations with system turns, tool declarations,
    # tool calls and tool results render identically through the tokenizer's Jinja template.
    for ours, tools in tool_call_prompts(tokenizer, 30):
        hf_messages = [dict(m, tool_calls=[{"type": "function", "function": c} for c in m["tool_calls"]])
                       if m.get("tool_calls") else m for m in ours]
        expected = tokenizer.apply_chat_template(hf_messages, tools=tools, tokenize=False, add_generation_prompt=True)
        assert chatml_prompt(ours, tools) == expected


def tool_call_prompts(tokenizer, count: int) -> list[tuple[list[dict], list | None]]:
    """Shared tool-calling conversations cut after their last user or tool turn, and their tools."""
    from minimind_scale.chat.messages import normalize_messages

    prompts = []
    for record in read_jsonl("sft_zh_toolcall_glaive.jsonl", count):
        messages, tools = normalize_messages(record)
        last = max(i for i, m in enumerate(messages) if m["role"] in ("user", "tool"))
        prompts.append(([dict(m, tool_calls=[c.get("function", c) for c in m["tool_calls"]]) if m.get("tool_calls")
                         else m for m in messages[:last + 1]], tools))
    return prompts


@pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed (CI installs golang-go)")
def test_modelfile_template_runs_in_go_as_the_tokenizers_template(hf_models, tmp_path):
    """TEMPLATE executed by Go's text/template (Ollama's engine) over Ollama-shaped data renders 60 shared
    tool-calling conversations, plain chats and consecutive tool results exactly as the tokenizer's template."""
    import subprocess

    from minimind_scale.export.ollama import TEMPLATE

    _, tokenizer = hf_models
    render = tmp_path / "render"
    subprocess.run(["go", "build", "-o", str(render), str(Path(__file__).parent / "ollama_render" / "main.go")],
                   check=True, env={**os.environ, "GOCACHE": str(tmp_path / "gocache")})
    cases = tool_call_prompts(tokenizer, 60)
    cases += [([{"role": "user", "content": r["conversations"][0]["content"]}], None)
              for r in read_jsonl("sft_en_alpaca_demo.jsonl", 10)]
    cases.append(([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                   {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 2}},
                                                                      {"name": "add", "arguments": {"b": 2}}]},
                   {"role": "tool", "content": "2"}, {"role": "tool", "content": "4"}], None))
    for messages, tools in cases:
        request = {"Template": TEMPLATE, "Tools": [json.dumps(t, ensure_ascii=False) for t in tools or []],
                   "Messages": [{"Role": m["role"], "Content": m["content"],
                                 "ToolCalls": [{"Name": c["name"], "Arguments": json.dumps(c["arguments"],
                                                                                         ensure_ascii=False)}
                                               for c in m.get("tool_calls") or []]} for m in messages]}
        done = subprocess.run([str(render)], input=json.dumps(request), capture_output=True, text=True, check=True)
        hf_messages = [dict(m, tool_calls=[{"type": "function", "function": c} for c in m["tool_calls"]])
                       if m.get("tool_calls") else m for m in messages]
        expected = tokenizer.apply_chat_template(hf_messages, tools=tools, tokenize=False, add_generation_prompt=True)
        assert done.stdout == expected, messages


# ----------------------------------------------------------------------------- other sources

def tensors(path: Path) -> dict[str, np.ndarray]:
    import gguf

    return {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}


def test_checkpoint_exports_the_same_file_as_its_model_directory(trained, gguf_files, tmp_path, capsys):
    out = tmp_path / "from_checkpoint.gguf"
    code, _, err = export(["--checkpoint", str(trained["moe"] / "checkpoints" / "step_200"), "--format", "gguf",
                           "--out_file", str(out), "--gguf_type", "f32"], capsys)
    assert code == 0, err
    ours, reference = tensors(out), tensors(gguf_files["moe", "f32"])
    assert ours.keys() == reference.keys()
    assert all(np.array_equal(ours[k], reference[k]) for k in ours)


def test_lora_checkpoint_is_merged_into_the_file(trained, tmp_path, data_cache, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "lora"
    run_cli(["lora", "--model", str(trained["dense"] / "final"), "--data_path", str(trained["dense"].parent /
             "conversations.jsonl"), "--out_dir", str(run), "--max_steps", "6", "--batch_size", "4",
             "--max_seq_len", "128", "--learning_rate", "5e-2", "--dtype", "fp32", "--num_proc", "1",
             "--save_interval", "6"], data_cache)
    out = tmp_path / "lora.gguf"
    code, _, err = export(["--checkpoint", str(run / "checkpoints" / "step_6"), "--format", "gguf",
                           "--out_file", str(out), "--gguf_type", "f32"], capsys)
    assert code == 0, err
    def base():
        return AutoModelForCausalLM.from_pretrained(trained["dense"] / "final", dtype=torch.float32).eval()

    merged = PeftModel.from_pretrained(base(), run / "final").merge_and_unload().eval()
    ids = list(range(100, 160))
    ours = llama_logprobs(llama(out), ids)
    gap_to_merged = np.abs(ours - hf_logprobs(merged, ids)).max()
    # ...and the adapter moved the model far more than llama.cpp's numerics do.
    assert gap_to_merged < 0.02 and np.abs(ours - hf_logprobs(base(), ids)).max() > 10 * gap_to_merged


def test_yarn_config_is_carried_and_computed_alike(trained, tmp_path, capsys):
    from minimind_scale.inference.loading import load_chat_model

    out = tmp_path / "yarn.gguf"
    code, _, err = export(["--model", str(trained["dense"] / "final"), "--format", "gguf", "--out_file", str(out),
                           "--gguf_type", "f32", "--yarn_factor", "4", "--yarn_original_max_position_embeddings",
                           "64"], capsys)
    assert code == 0, err
    fields = gguf_fields(out)
    assert fields["qwen3.rope.scaling.type"] == "yarn" and fields["qwen3.rope.scaling.factor"] == 4.0
    assert fields["qwen3.rope.scaling.original_context_length"] == 64
    model, _ = load_chat_model(str(trained["dense"] / "final"), dtype="fp32", yarn_factor=4,
                               yarn_original_max_position_embeddings=64, device="cpu")
    ids = [(7 * i) % 6000 + 300 for i in range(200)]  # well past the original 64 positions
    ours = llama_logprobs(llama(out), ids)
    assert np.abs(ours - hf_logprobs(model, ids)).max() < 0.01
    plain, _ = load_chat_model(str(trained["dense"] / "final"), dtype="fp32", device="cpu")
    assert np.abs(ours - hf_logprobs(plain, ids)).max() > 0.5  # YaRN changes what the model computes


# ----------------------------------------------------------------------------- refusals

def test_refusals_exit_2_with_one_message(trained, gguf_files, tmp_path, capsys):
    final = str(trained["dense"] / "final")
    existing = gguf_files["dense", "f16"]
    cases = {
        "'f32', 'f16', 'bf16', 'q8_0' or 'q4_k_m'": ["--model", final, "--format", "gguf", "--out_file",
                                                    str(tmp_path / "a.gguf"), "--gguf_type", "q5_k"],
        "exists; pass --overwrite true": ["--model", final, "--format", "gguf", "--out_file", str(existing)],
        "--out_dir is for --format hf": ["--model", final, "--format", "gguf", "--out_file",
                                         str(tmp_path / "b.gguf"), "--out_dir", str(tmp_path / "c")],
        "give --out_file": ["--model", final, "--format", "gguf"],
        "exactly one of --checkpoint": ["--format", "gguf", "--out_file", str(tmp_path / "d.gguf")],
        "name the file *.gguf": ["--model", final, "--format", "gguf", "--out_file", str(tmp_path / "e.bin")],
    }
    for expected, args in cases.items():
        code, out, err = export(args, capsys)
        assert code == 2 and expected in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) <= 2, err
    before = existing.read_bytes()
    code, _, err = export(["--model", final, "--format", "gguf", "--out_file", str(existing), "--overwrite", "true",
                           "--gguf_type", "f16"], capsys)
    assert code == 0, err
    assert existing.read_bytes() == before  # the same model, type and writer give the same bytes
    assert not list(existing.parent.glob(".*partial"))


def test_unsupported_architectures_exit_2(trained, tmp_path, capsys):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(trained["dense"] / "final")
    llama_dir, reward_dir = tmp_path / "llama", tmp_path / "reward"
    small = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(LlamaConfig(**small)).save_pretrained(llama_dir)
    Qwen3ForSequenceClassification(Qwen3Config(**small, num_labels=1, head_dim=16)).save_pretrained(reward_dir)
    for directory in (llama_dir, reward_dir):
        tokenizer.save_pretrained(directory)
    code, _, err = export(["--model", str(llama_dir), "--format", "gguf", "--out_file", str(tmp_path / "l.gguf")],
                          capsys)
    assert code == 2 and "LlamaForCausalLM is not supported" in err, err
    code, _, err = export(["--model", str(reward_dir), "--format", "gguf", "--out_file", str(tmp_path / "r.gguf")],
                          capsys)
    assert code == 2 and "Qwen3ForSequenceClassification" in err, err
    assert not list(tmp_path.glob("*.gguf"))


def test_a_copy_of_the_file_runs_from_another_folder(gguf_files, tmp_path):
    """The file is self-contained: tokenizer, template and weights travel in it (nothing read from beside it)."""
    copy = tmp_path / "elsewhere.gguf"
    shutil.copy(gguf_files["dense", "q8_0"], copy)
    model = llama(copy)
    assert model.metadata["general.architecture"] == "qwen3"
    assert llama_logprobs(model, [1, 200, 300]).shape == (3, 6400)
