"""YaRN options: transformers' own rope scaling set in the loaded or exported config, by chat, serve, eval and
export alike."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import DEMO, cli_in_process, cli_output_in_process
from minimind_scale.models.build import load_tokenizer, preset_config
from minimind_scale.models.yarn import apply_yarn

pytestmark = pytest.mark.usefixtures("one_thread")

# A small original length, so that rows of ~100 tokens lie beyond it.
ORIGINAL, FACTOR = 32, 4.0
YARN = ["--yarn_factor", str(FACTOR), "--yarn_original_max_position_embeddings", str(ORIGINAL)]


def test_the_rope_parameters_are_minimind_yarn_and_keep_rope_theta():
    config = preset_config("tiny", 1024, load_tokenizer(None))
    assert apply_yarn(config, None) is config and config.rope_parameters["rope_type"] == "default"
    apply_yarn(config, 16, 2048)
    assert config.rope_parameters == {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0,
                                      "original_max_position_embeddings": 2048, "beta_fast": 32.0, "beta_slow": 1.0,
                                      "attention_factor": 1.0}
    assert config.max_position_embeddings == 32768


@pytest.fixture(scope="module")
def long_rows(tmp_path_factory):
    """Pretraining rows of about 100 tokens: several demo texts joined."""
    texts = [json.loads(line)["text"] for line in (DEMO / "pretrain.jsonl").read_text().splitlines()[:40]]
    path = tmp_path_factory.mktemp("yarn") / "long.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(texts[i:i + 4])}) + "\n" for i in range(0, 40, 4)))
    tokenizer = load_tokenizer(None)
    lengths = [len(tokenizer(json.loads(line)["text"])["input_ids"]) for line in path.read_text().splitlines()]
    assert min(lengths) > 2 * ORIGINAL, lengths
    return path


def run_ok(args, capsys) -> str:
    """stdout of a command run through the real entry point in this process (cli_in_process keeps only stderr)."""
    code, out, err = cli_output_in_process(args, capsys)
    assert code == 0, err
    return out


def test_an_exported_config_loads_with_yarn(tool_memorised_model, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = tool_memorised_model[0]
    [ckpt] = sorted((model_dir.parent / "checkpoints").glob("step_*"))[-1:]
    out = tmp_path / "exported"
    run_ok(["export", "--checkpoint", str(ckpt), "--out_dir", str(out), *YARN], capsys)
    config = AutoConfig.from_pretrained(out)
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["factor"] == FACTOR
    assert config.rope_parameters["original_max_position_embeddings"] == ORIGINAL
    assert config.rope_parameters["rope_theta"] == AutoConfig.from_pretrained(model_dir).rope_parameters["rope_theta"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.rotary_emb.rope_type == "yarn"
    # The same weights, other positions: beyond the original length the logits change.
    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.arange(3, 3 + 3 * ORIGINAL).unsqueeze(0)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, plain(ids).logits, atol=1e-4)


def eval_result(model_dir, rows, cache, capsys, *extra) -> dict:
    out = run_ok(["eval", "--model", str(model_dir), "--data_path", str(rows), "--max_seq_len", "128",
                  "--batch_size", "4", "--num_proc", "1", "--cache_dir", str(cache), *extra], capsys)
    return json.loads(out.strip().splitlines()[-1])


def test_eval_runs_with_yarn_on_rows_longer_than_the_original_length(tool_memorised_model, long_rows, tmp_path,
                                                                      capsys):
    model_dir = tool_memorised_model[0]
    with_yarn = eval_result(model_dir, long_rows, tmp_path, capsys, *YARN)
    plain = eval_result(model_dir, long_rows, tmp_path, capsys)
    assert with_yarn["records"] == plain["records"] == 10 and with_yarn["tokens"] == plain["tokens"] > 10 * 2 * ORIGINAL
    assert math.isfinite(with_yarn["loss"]) and with_yarn["loss"] != pytest.approx(plain["loss"], abs=1e-6)


def test_chat_and_serve_load_the_model_with_yarn_and_a_factor_below_1_is_refused(tool_memorised_model, capsys):
    from minimind_scale.inference.loading import load_chat_model

    model_dir = str(tool_memorised_model[0])
    model, _ = load_chat_model(model_dir, yarn_factor=FACTOR, yarn_original_max_position_embeddings=ORIGINAL)
    assert model.model.rotary_emb.rope_type == "yarn" and model.config.max_position_embeddings == FACTOR * ORIGINAL
    run_ok(["chat", "--model", model_dir, "--prompt", "hello", "--max_new_tokens", "4", *YARN], capsys)
    for command, args in [("chat", ["--model", model_dir]), ("serve", ["--model", model_dir]),
                          ("eval", ["--model", model_dir]), ("export", ["--checkpoint", "c", "--out_dir", "o"])]:
        code, err = cli_in_process([command, *args, "--yarn_factor", "0.5"], capsys)
        assert code == 2 and "yarn_factor" in err and "greater than or equal to 1" in err, (command, err)
