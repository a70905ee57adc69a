"""`chat`: one-shot answers through the CLI, reproducible seeds, the interactive loop, think blocks."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from minimind_scale.errors import UserError
from minimind_scale.inference import chat as generate
from minimind_scale.inference.chat import ChatConfig, ChatStreamer, answer, run, strip_empty_think
from minimind_scale.inference.loading import load_chat_model

REPO = Path(__file__).resolve().parents[1]
DEMO_SFT = REPO / "minimind_scale" / "assets" / "demo" / "sft.jsonl"
QUESTION = "What is the capital of France?"


def _env(cache: Path) -> dict:
    return dict(os.environ, MINIMIND_SCALE_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def _cli(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minimind_scale", *args], env=_env(cache),
                          capture_output=True, text=True, timeout=300)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    with open(DEMO_SFT, encoding="utf-8") as f:
        (root / "sft.jsonl").write_text("".join(next(f) for _ in range(40)), encoding="utf-8")
    proc = _cli(["sft", "--model", "tiny", "--data_path", str(root / "sft.jsonl"), "--out_dir", str(root / "run"),
                 "--max_steps", "5", "--batch_size", "4", "--max_seq_len", "64", "--dtype", "fp32",
                 "--log_interval", "1", "--learning_rate", "1e-3", "--num_proc", "1"], root / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    yield {"model": root / "run" / "final", "root": root}
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def loaded(work):
    return load_chat_model(str(work["model"]))


def _run_prompt(capsys, model_dir: Path, **kwargs) -> str:
    capsys.readouterr()
    run(ChatConfig(model=str(model_dir), **kwargs))
    return capsys.readouterr().out


# --------------------------------------------------------------------------- the command line


def test_cli_prompt_answers_and_seed_reproduces(capsys, work):
    proc = _cli(["chat", "--model", str(work["model"]), "--prompt", QUESTION, "--max_new_tokens", "8", "--seed", "0"],
                work["root"] / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli_answer = proc.stdout.strip()
    assert cli_answer
    # The same seed gives the same sampled answer, in another process and on every call.
    again = [_run_prompt(capsys, work["model"], prompt=QUESTION, max_new_tokens=8, seed=0) for _ in range(2)]
    assert again[0] == again[1] == proc.stdout
    other = {_run_prompt(capsys, work["model"], prompt=QUESTION, max_new_tokens=8, seed=s) for s in (1, 2, 3)}
    assert other != {proc.stdout}, "the seed has no effect on sampling"


def test_cli_missing_model_is_a_user_error(work, tmp_path):
    proc = _cli(["chat", "--model", str(tmp_path / "nope"), "--prompt", "hi"], work["root"] / "cache")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "model directory not found" in proc.stderr and str(tmp_path / "nope") in proc.stderr
    assert proc.stdout == ""


def test_missing_adapter_is_a_user_error(work, tmp_path):
    with pytest.raises(UserError, match="adapter"):
        load_chat_model(str(work["model"]), adapter=str(tmp_path))


def test_adapter_is_applied(work, loaded, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(work["model"]), dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(str(tmp_path / "lora"))
    model, tokenizer = load_chat_model(str(work["model"]), adapter=str(tmp_path / "lora"))
    assert isinstance(model, PeftModel)
    # A fresh LoRA adapter starts as the identity (B = 0), so greedy answers do not change.
    messages = [{"role": "user", "content": QUESTION}]
    assert answer(model, tokenizer, messages, max_new_tokens=5, temperature=0) == \
        answer(*loaded, messages, max_new_tokens=5, temperature=0)


# --------------------------------------------------------------------------- answer()


def test_answer_greedy_is_deterministic_and_clean(loaded):
    model, tokenizer = loaded
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    first = answer(model, tokenizer, messages, max_new_tokens=6, temperature=0)
    assert first == answer(model, tokenizer, messages, max_new_tokens=6, temperature=0)
    assert "<think>" not in first and "<|im_end|>" not in first


def test_answer_with_think_opens_thinking_and_shows_it(loaded, monkeypatch):
    model, tokenizer = loaded
    prompts = []
    real_encode = generate.encode_prompt

    def spy(messages, tools, tok, **template_kwargs):
        ids = real_encode(messages, tools, tok, **template_kwargs)
        prompts.append(tok.decode(ids))
        return ids

    monkeypatch.setattr(generate, "encode_prompt", spy)
    question = [{"role": "user", "content": QUESTION}]
    reply = answer(model, tokenizer, question, max_new_tokens=4, temperature=0, think=True)
    assert reply.startswith("<think>")
    assert prompts[-1].endswith("<|im_start|>assistant\n<think>\n")  # the model writes the reasoning
    answer(model, tokenizer, question, max_new_tokens=4, temperature=0)
    assert prompts[-1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_strip_empty_think():
    assert strip_empty_think("<think>\n\n</think>\n\nParis.") == "Paris."
    assert (strip_empty_think("<think>\nParis is in France.\n</think>\n\nParis.")
            == "<think>\nParis is in France.\n</think>\n\nParis.")
    assert strip_empty_think("Paris.") == "Paris."


def _stream(chunks: list[str], hide: bool, tokenizer, capsys) -> str:
    streamer = ChatStreamer(tokenizer, hide_empty_think=hide)
    capsys.readouterr()
    for i, chunk in enumerate(chunks):
        streamer.on_finalized_text(chunk, stream_end=i == len(chunks) - 1)
    return capsys.readouterr().out


def test_streamer_hides_only_an_empty_think_block(loaded, capsys):
    tokenizer = loaded[1]
    assert _stream(["<think>\n", "\n", "</think>\n", "\n", "Paris is ", "the capital."], True, tokenizer, capsys) \
        == "Paris is the capital.\n"
    assert _stream(["<think>\n", "France...\n", "</think>\n", "Paris."], True, tokenizer, capsys) \
        == "<think>\nFrance...\n</think>\nParis.\n"
    assert _stream(["<th", "ink>\n\n</think>\n\n"], True, tokenizer, capsys) == "\n"  # nothing but the block
    assert _stream(["<thinking about it", " now"], True, tokenizer, capsys) == "<thinking about it now\n"
    assert _stream(["<think>\n", "\n", "</think>\n", "A"], False, tokenizer, capsys) == "<think>\n\n</think>\nA\n"
    # Reused for a second answer, the streamer hides the block again.
    streamer = ChatStreamer(tokenizer)
    for _ in range(2):
        capsys.readouterr()
        for i, chunk in enumerate(["<think>\n\n</think>\n\n", "Hi"]):
            streamer.on_finalized_text(chunk, stream_end=i == 1)
        assert capsys.readouterr().out == "Hi\n"


# --------------------------------------------------------------------------- the interactive loop


def test_interactive_loop_keeps_history_resets_and_exits(work, monkeypatch, capsys):
    calls = []

    def fake_answer(model, tokenizer, messages, **sampling):
        calls.append([dict(m) for m in messages])
        return f"reply {len(calls)}"

    monkeypatch.setattr(generate, "answer", fake_answer)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\nmore\n/reset\nhi\n/exit\nnever read\n"))
    run(ChatConfig(model=str(work["model"]), system="Be brief."))
    system = {"role": "system", "content": "Be brief."}
    assert calls == [
        [system, {"role": "user", "content": "hello"}],
        [system, {"role": "user", "content": "hello"}, {"role": "assistant", "content": "reply 1"},
         {"role": "user", "content": "more"}],
        [system, {"role": "user", "content": "hi"}],
    ]


def test_interactive_loop_streams_real_answers_until_eof(work, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nand again\n"))  # EOF ends the session
    capsys.readouterr()
    run(ChatConfig(model=str(work["model"]), max_new_tokens=4, temperature=0))
    captured = capsys.readouterr()
    assert captured.out.count("\n") >= 2  # each streamed answer ends its line
    assert "<think>" not in captured.out and "<|im_end|>" not in captured.out
    assert captured.err.count("> ") >= 3
