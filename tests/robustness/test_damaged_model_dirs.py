"""A damaged model or adapter directory given to any command ends in exit 2 and one message naming the
directory and what is wrong with it, before any data work and without a traceback.

One tiny model (and one LoRA adapter of it) is written once; each case damages a copy the way a cut-off
download or a hand edit would, and runs a real command on it in this process.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from tests.conftest import DEMO, cli_in_process

# Each check runs before the data is read, so no data is tokenised and no output directory is used.


@pytest.fixture(scope="module")
def good_model(tmp_path_factory) -> Path:
    """A 1-layer, 32-wide model in Hugging Face format, with its tokenizer."""
    import torch

    from minimind_scale.models.build import build_model, load_tokenizer, save_hf

    torch.manual_seed(0)
    tokenizer = load_tokenizer(None)
    out = tmp_path_factory.mktemp("models") / "good"
    save_hf(build_model("tiny", tokenizer, hidden_size=32, num_hidden_layers=1), tokenizer, out)
    return out


@pytest.fixture(scope="module")
def good_adapter(good_model, tmp_path_factory) -> Path:
    """A LoRA adapter of `good_model`, as the lora stage writes one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapters") / "good"
    base = AutoModelForCausalLM.from_pretrained(good_model)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(out)
    return out


def safetensors_header_end(file: Path) -> int:
    """Where the tensor data of a safetensors file starts, read independently of the code under test."""
    with open(file, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def without_weights(d: Path) -> str:
    (d / "model.safetensors").unlink()
    return "no weights"


def body_cut(d: Path) -> str:
    file = d / "model.safetensors"
    keep = safetensors_header_end(file) + 100  # the header whole, most of the tensors gone
    file.write_bytes(file.read_bytes()[:keep])
    return "truncated"


def header_cut(d: Path) -> str:
    file = d / "model.safetensors"
    file.write_bytes(file.read_bytes()[:safetensors_header_end(file) // 2])
    return "truncated inside its header"


def field_of_wrong_type(d: Path) -> str:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}))
    return "hidden_size"


def config_not_json(d: Path) -> str:
    (d / "config.json").write_text('{"hidden_size": 32,\n')
    return "not valid JSON"


def config_missing(d: Path) -> str:
    (d / "config.json").unlink()
    return "no config.json"


DAMAGES = [without_weights, body_cut, header_cut, field_of_wrong_type, config_not_json, config_missing]


@pytest.fixture(params=DAMAGES, ids=lambda damage: damage.__name__)
def damaged_model(request, good_model, tmp_path) -> tuple[Path, str]:
    """(a damaged copy of the good model, words the error message must contain)."""
    bad = tmp_path / "bad_model"
    shutil.copytree(good_model, bad)
    return bad, request.param(bad)


def assert_one_clean_message(code: int, err: str, directory: Path, problem: str, option: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if str(directory) in line]
    assert len(lines) == 1, err
    assert problem in lines[0] and option in lines[0], err


COMMANDS = {
    "eval": lambda bad, good, tmp: ["eval", "--model", str(bad), "--data_path", str(DEMO / "sft.jsonl")],
    "full_sft": lambda bad, good, tmp: ["full_sft", "--model", str(bad), "--data_path", str(DEMO / "sft.jsonl"),
                                        "--out_dir", str(tmp / "out")],
    "chat": lambda bad, good, tmp: ["chat", "--model", str(bad), "--prompt", "hi", "--dtype", "fp32"],
    "distill": lambda bad, good, tmp: ["distill", "--model", str(good), "--teacher", str(bad), "--data_path",
                                       str(DEMO / "sft.jsonl"), "--out_dir", str(tmp / "out")],
}
OPTION = {"distill": "teacher"}  # "--teacher", or the field name where the validator refuses it


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_damaged_model_directory_is_refused(command, damaged_model, good_model, tmp_path, capsys):
    bad, problem = damaged_model
    code, err = cli_in_process(COMMANDS[command](bad, good_model, tmp_path), capsys)
    assert_one_clean_message(code, err, bad, problem, OPTION.get(command, "--model"))
    assert not (tmp_path / "out" / "final").exists()


@pytest.mark.parametrize("option, stage, extra", [
    ("--ref_model", "dpo", []),
    ("--critic", "ppo", ["--reward_funcs", "minimind_format"]),
    ("--reward_model", "ppo", []),
    ("--reward_model", "grpo", []),
])
def test_damaged_reference_critic_and_reward_model_are_refused(option, stage, extra, good_model, tmp_path, capsys):
    bad = tmp_path / "bad_model"
    shutil.copytree(good_model, bad)
    problem = body_cut(bad)
    data = DEMO / "sft.jsonl"  # never read: the directory is refused first
    code, err = cli_in_process([stage, "--model", str(good_model), option, str(bad), *extra, "--data_path",
                                str(data), "--out_dir", str(tmp_path / "out")], capsys)
    assert_one_clean_message(code, err, bad, problem, option)


def test_adapter_without_weights_is_refused(good_model, good_adapter, tmp_path, capsys):
    bad = tmp_path / "bad_adapter"
    shutil.copytree(good_adapter, bad)
    (bad / "adapter_model.safetensors").unlink()
    code, err = cli_in_process(["chat", "--model", str(good_model), "--adapter", str(bad), "--prompt", "hi",
                                "--dtype", "fp32"], capsys)
    assert_one_clean_message(code, err, bad, "no weights", "--adapter")


def test_intact_directories_pass_the_check(good_model, good_adapter):
    from minimind_scale.models.model_dir import check_model_dir

    check_model_dir(good_model)
    check_model_dir(good_adapter, "--adapter", adapter=True)
