"""A stage written outside the package is found, listed and trained exactly like the built-ins."""
from __future__ import annotations

import json
import re

import pytest

from conftest import DEMO, REPO, read_metrics, run_cli

EXAMPLE = REPO / "examples" / "completion_stage.py"


def test_readme_shows_the_tested_example():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    body = EXAMPLE.read_text().split('"""', 2)[2].strip()
    assert any(b.strip() == body for b in blocks), "README's plugin example differs from examples/completion_stage.py"


def test_plugin_is_listed_and_trains(tmp_path, data_cache):
    data = tmp_path / "pairs.jsonl"
    with open(data, "w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"{i} plus 1 is", "completion": f"{i + 1}."}) + "\n")
    top = run_cli(["--plugin", str(EXAMPLE), "--help"], data_cache).stdout
    assert re.search(r"^\s+completion\s+prompt -> completion", top, flags=re.M)
    help_text = run_cli(["--plugin", str(EXAMPLE), "completion", "--help"], data_cache).stdout
    assert "--separator" in help_text and "--learning_rate" in help_text

    out = tmp_path / "run"
    run_cli(["--plugin", str(EXAMPLE), "completion", "--model", "tiny", "--data_path", str(data), "--out_dir", str(out),
             "--max_steps", "6", "--batch_size", "8", "--max_seq_len", "32", "--learning_rate", "3e-3",
             "--log_interval", "1", "--dtype", "fp32", "--num_proc", "1"], data_cache)
    rows = read_metrics(out)
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]
    # Only completion tokens carry loss: "N." plus eos is 2-4 tokens per record, far fewer than the row.
    assert rows[0]["tokens"] <= 8 * 4
    assert (out / "final" / "model.safetensors").is_file()


def test_plugin_from_environment_variable(tmp_path, data_cache):
    top = run_cli(["--help"], data_cache, MINIMIND_SCALE_PLUGINS=str(EXAMPLE)).stdout
    assert "completion" in top


def test_broken_plugin_is_a_user_error(tmp_path, data_cache):
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    proc = run_cli(["--plugin", str(bad), "--help"], data_cache, check=False)
    assert proc.returncode == 2 and "bad.py" in proc.stderr and "Traceback" not in proc.stderr


def test_an_offline_stage_must_count_its_loss_units():
    from minimind_scale import StageSpec, TrainConfig

    hooks = {"name": "x", "help": "x", "config": TrainConfig, "encode": dict, "collate": dict, "loss": dict}
    with pytest.raises(ValueError, match="loss_units is required"):
        StageSpec(**hooks)
    assert StageSpec(**hooks, rollout=list).loss_units is None  # its rollout counts its batches
    with pytest.raises(ValueError, match="eval_overrides names \\['no_such_field'\\]"):
        StageSpec(**hooks, loss_units=len, eval_overrides={"no_such_field": 1})


# A rollout that hands back each loader batch as a CountedBatch, counted as full_sft counts it.
COUNTED_STAGE = """
from minimind_scale import register_stage
from minimind_scale.data.batching import token_counts
from minimind_scale.stages.full_sft import SPEC as SFT
from minimind_scale.training.batch import CountedBatch


def counted(model, batches, cfg, ctx):
    out = []
    for batch in batches:
        labels, inputs = token_counts(batch)
        out.append(CountedBatch(batch, loss_units=float(labels), label_tokens=float(labels),
                                input_tokens=float(inputs)))
    return out


register_stage(SFT.model_copy(update={"name": "counted", "aliases": (), "help": "full_sft through CountedBatch",
                                      "rollout": counted, "loss_units": None}))
"""


def test_counted_batches_train_as_the_dicts_they_count(tmp_path, data_cache):
    plugin = tmp_path / "counted_stage.py"
    plugin.write_text(COUNTED_STAGE)
    args = ["--model", "tiny", "--data_path", str(DEMO / "sft.jsonl"), "--max_steps", "3", "--batch_size", "4",
            "--accumulation_steps", "2", "--max_seq_len", "64", "--packing", "false", "--learning_rate", "1e-3",
            "--log_interval", "1", "--dtype", "fp32", "--num_proc", "1"]
    run_cli(["sft", *args, "--out_dir", str(tmp_path / "dicts")], data_cache)
    run_cli(["--plugin", str(plugin), "counted", *args, "--out_dir", str(tmp_path / "counted")], data_cache)
    for a, b in zip(read_metrics(tmp_path / "dicts"), read_metrics(tmp_path / "counted"), strict=True):
        assert (a["loss"], a["tokens"], a["grad_norm"]) == (b["loss"], b["tokens"], b["grad_norm"])
