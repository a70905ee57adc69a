"""The post-training chain through the real command line: SFT -> LoRA, DPO and distillation on it."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEMO, read_metrics, run_cli

COMMON = ["--max_seq_len", "96", "--dtype", "fp32", "--log_interval", "1", "--num_proc", "1", "--seed", "7"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory, data_cache) -> Path:
    out = tmp_path_factory.mktemp("sft")
    run_cli(["sft", "--data_path", str(DEMO / "sft.jsonl"), "--model", "tiny", "--max_steps", "5", "--batch_size", "8",
             "--learning_rate", "3e-3", "--out_dir", str(out), *COMMON], data_cache)
    return out / "final"


@pytest.fixture(scope="module")
def dpo_pairs(tmp_path_factory) -> Path:
    """Demo conversations as pairs: chosen = the real answer, rejected = the next record's answer."""
    rows = [json.loads(line) for line in (DEMO / "sft.jsonl").read_text().splitlines()[:48]]
    out = tmp_path_factory.mktemp("dpo_data") / "pairs.jsonl"
    with open(out, "w") as f:
        for i, row in enumerate(rows):
            conv = row["conversations"]
            wrong = rows[(i + 1) % len(rows)]["conversations"][-1]["content"]
            if wrong == conv[-1]["content"]:
                wrong = "I do not know."
            f.write(json.dumps({"chosen": conv,
                                "rejected": conv[:-1] + [{"role": "assistant", "content": wrong}]}) + "\n")
    return out


def logits_of(model, tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of Peru?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_trains_only_the_adapter_and_merges_exactly(tmp_path, data_cache, sft_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_file = sft_model / "model.safetensors"
    before = sha256(base_file)
    out = tmp_path / "lora"
    run_cli(["lora", "--data_path", str(DEMO / "sft.jsonl"), "--model", str(sft_model), "--max_steps", "4",
             "--batch_size", "8", "--learning_rate", "1e-2", "--merge_lora", "true", "--out_dir", str(out), *COMMON],
            data_cache)
    assert sha256(base_file) == before

    final = out / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())  # B starts at 0: it trained

    # The training state held the base too: every base weight is still the SFT model's, bit for bit.
    base = load_file(str(base_file))
    state = load_file(str(next((out / "checkpoints").glob("step_*")) / "model.safetensors"))
    frozen = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v
              for k, v in state.items() if "lora_" not in k}
    assert set(base) <= set(frozen)
    for k, v in base.items():
        assert torch.equal(v, frozen[k]), k

    tok = AutoTokenizer.from_pretrained(str(sft_model))
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(sft_model)), str(final)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(final / "merged")).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(sft_model)).eval()
    expected = logits_of(with_adapter, tok)
    assert torch.allclose(logits_of(merged, tok), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(logits_of(plain, tok), expected, atol=1e-4)

    # Seeded: unseeded, an 8-token sample of this barely trained model is now and then just the end of turn.
    chat = run_cli(["chat", "--model", str(sft_model), "--adapter", str(final), "--prompt", "Who are you?",
                    "--seed", "0", "--max_new_tokens", "8"], data_cache)
    assert chat.stdout.strip()


def test_lora_refuses_a_preset(tmp_path, data_cache):
    proc = run_cli(["lora", "--data_path", str(DEMO / "sft.jsonl"), "--model", "tiny", "--out_dir", str(tmp_path)],
                   data_cache, check=False)
    assert proc.returncode == 2 and "model directory" in proc.stderr + proc.stdout


def dpo_args(data: Path, model: Path, out: Path, *extra: str, batch_size: int = 4) -> list[str]:
    return ["dpo", "--data_path", str(data), "--model", str(model), "--max_steps", "3", "--batch_size", str(batch_size),
            "--learning_rate", "1e-3", "--beta", "0.1", "--out_dir", str(out), *COMMON, *extra]


def test_dpo_starts_at_ln2_and_precomputed_reference_matches_live(tmp_path, data_cache, sft_model, dpo_pairs):
    run_cli(dpo_args(dpo_pairs, sft_model, tmp_path / "live"), data_cache)
    live = read_metrics(tmp_path / "live")
    assert abs(live[0]["loss"] - math.log(2)) < 1e-4
    for key in ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "logps_chosen",
                "logps_rejected"):
        assert all(key in row and math.isfinite(row[key]) for row in live), key
    assert live[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert 0.0 <= live[-1]["reward_accuracy"] <= 1.0
    # The policy moves (lr 1e-3), so later steps only agree if the reference is the same one.
    assert live[-1]["reward_margin"] != pytest.approx(0.0, abs=1e-6)

    first = run_cli(dpo_args(dpo_pairs, sft_model, tmp_path / "pre", "--precompute_ref", "true"), data_cache)
    again = run_cli(dpo_args(dpo_pairs, sft_model, tmp_path / "pre2", "--precompute_ref", "true"), data_cache)
    assert "precomputing reference log-probs" in first.stdout
    assert "using cached reference log-probs" in again.stdout
    for run in ("pre", "pre2"):
        for a, b in zip(live, read_metrics(tmp_path / run)):
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
            assert b["reward_margin"] == pytest.approx(a["reward_margin"], abs=1e-5)


def test_dpo_two_processes(tmp_path, data_cache, sft_model, dpo_pairs):
    """Each rank scores every other pair and an all-gather assembles the reference table: were a row
    misplaced, the policy (= reference) would not give ln 2. max_seq_len 80 keeps the cached table of
    the single-process test from being reused."""
    out = tmp_path / "ddp"
    proc = run_cli(dpo_args(dpo_pairs, sft_model, out, "--precompute_ref", "true", "--max_seq_len", "80", batch_size=2),
                   data_cache, nproc=2)
    assert "precomputing reference log-probs" in proc.stdout
    rows = read_metrics(out)
    assert rows[0]["world_size"] == 2 and len(rows) == 3
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-4
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert (out / "final" / "model.safetensors").is_file()


def test_dpo_rejects_identical_sides(tmp_path, data_cache, sft_model):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"chosen": conv, "rejected": conv}) + "\n")
    proc = run_cli(dpo_args(bad, sft_model, tmp_path / "o"), data_cache, check=False)
    assert proc.returncode == 2
    assert "bad.jsonl:1" in proc.stderr and "rejected" in proc.stderr and "identical" in proc.stderr


def test_distill_a_smaller_student(tmp_path, data_cache, sft_model):
    out = tmp_path / "student"
    run_cli(["distill", "--data_path", str(DEMO / "sft.jsonl"), "--teacher", str(sft_model), "--model", "tiny",
             "--hidden_size", "32", "--max_steps", "3", "--batch_size", "8", "--learning_rate", "3e-3",
             "--delimiter_weight", "2", "--out_dir", str(out), *COMMON], data_cache)
    rows = read_metrics(out)
    assert all(math.isfinite(r["kd_loss"]) and math.isfinite(r["ce_loss"]) for r in rows)
    assert rows[0]["kd_loss"] > 0
    # loss = alpha·CE + (1 - alpha)·KD with the default alpha 0.5
    assert rows[0]["loss"] == pytest.approx(0.5 * rows[0]["ce_loss"] + 0.5 * rows[0]["kd_loss"], rel=1e-5)
    assert json.loads((out / "final" / "config.json").read_text())["hidden_size"] == 32


def test_distill_refuses_a_teacher_with_another_vocabulary(tmp_path, data_cache):
    from transformers import AutoModelForCausalLM

    from minimind_scale.models.build import load_tokenizer, preset_config

    tok = load_tokenizer(None)
    teacher = tmp_path / "teacher"
    AutoModelForCausalLM.from_config(preset_config("tiny", len(tok) + 512, tok, hidden=32)).save_pretrained(teacher)
    proc = run_cli(["distill", "--data_path", str(DEMO / "sft.jsonl"), "--teacher", str(teacher), "--model", "tiny",
                    "--max_steps", "1", "--out_dir", str(tmp_path / "o"), *COMMON], data_cache, check=False)
    assert proc.returncode == 2
    assert str(len(tok)) in proc.stderr and str(len(tok) + 512) in proc.stderr and "Traceback" not in proc.stderr


STAGE_FIELDS = {
    "lora": ["lora_rank", "lora_alpha", "lora_dropout", "target_modules", "merge_lora"],
    "dpo": ["ref_model", "beta", "loss_type", "label_smoothing", "precompute_ref"],
    "distill": ["teacher", "alpha", "temperature", "delimiter_weight"],
}


def test_stages_are_listed_and_document_their_fields(data_cache):
    top = run_cli(["--help"], data_cache).stdout
    for stage, fields in STAGE_FIELDS.items():
        assert any(line.split()[:1] == [stage] for line in top.splitlines()), stage
        text = run_cli([stage, "--help"], data_cache).stdout
        for name in fields:
            line = next((x for x in text.splitlines() if x.strip().startswith(f"--{name} ")), None)
            assert line is not None and "default" in line, (stage, name)
