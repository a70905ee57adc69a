"""The same training command under the launchers users type, on CPU processes (gloo)."""
from __future__ import annotations

import socket
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import SHARED, cli_env, needs_shared, read_metrics

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_shared
def test_accelerate_two_cpu_processes_on_real_chats(tmp_path, data_cache):
    """accelerate launch --multi_gpu --num_processes 2 on a GPU-less machine forms one gloo job on
    MiniMind's tokenizer and real conversations: the loss falls and final/ loads and generates."""
    out = tmp_path / "run"
    cmd = [*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "minimind_scale", "sft",
           "--model", "tiny", "--tokenizer", str(SHARED / "tokenizers" / "minimind"),
           "--data_path", str(SHARED / "data" / "sft_zh_alpaca_demo.jsonl"), "--out_dir", str(out),
           "--max_steps", "24", "--batch_size", "4", "--max_seq_len", "128", "--learning_rate", "3e-3",
           "--log_interval", "4", "--dtype", "fp32", "--num_proc", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=cli_env(data_cache))
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = read_metrics(out)
    assert all(r["world_size"] == 2 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, [r["loss"] for r in rows]
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    prompt = tok.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == prompt["input_ids"].shape[1] + 5 or tok.eos_token_id in gen[0].tolist()


def test_accelerate_cpu_flag_mismatch_is_refused(tmp_path, data_cache):
    """`accelerate launch --cpu --num_processes 2` silently starts one process; the engine says so."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n')
    cmd = [*ACCELERATE, "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "minimind_scale", "pretrain", "--model", "tiny",
           "--data_path", str(data), "--out_dir", str(tmp_path / "run"), "--max_steps", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=cli_env(data_cache))
    assert proc.returncode != 0
    assert "starts ONE process" in proc.stderr and "--multi_gpu" in proc.stderr
    assert not (tmp_path / "run" / "final").exists()
