"""GRPO's bad input: each is exit 2 with one message naming the file and line, or the reward file, function and
sample, and no traceback."""
from __future__ import annotations

import json

import pytest

from conftest import cli_in_process, run_cli


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    from minimind_scale.models.build import build_model, load_tokenizer, save_hf

    root = tmp_path_factory.mktemp("grpo_bad")
    tokenizer = load_tokenizer(None)
    save_hf(build_model("tiny", tokenizer), tokenizer, root / "start")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"count to {i}"}) + "\n" for i in range(8)))
    return root


def grpo(start, out, *extra) -> list[str]:
    return ["grpo", "--model", str(start / "start"), "--out_dir", str(out), "--num_generations", "2",
            "--batch_size", "2", "--max_gen_len", "4", "--max_steps", "1", "--dtype", "fp32", "--num_proc", "1", *extra]


def test_record_without_a_prompt_names_file_and_line(start, tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"question": "no prompt here"}) + "\n")
    code, err = cli_in_process(grpo(start, tmp_path / "o", "--data_path", str(data), "--reward_funcs",
                                    "minimind_format"), capsys)
    assert code == 2 and f"{data}:2" in err and "'prompt'" in err and "Traceback" not in err


def test_one_generation_with_group_scaling_is_refused(start, tmp_path, capsys):
    code, err = cli_in_process(grpo(start, tmp_path / "o", "--data_path", str(start / "prompts.jsonl"),
                                    "--reward_funcs", "minimind_format", "--num_generations", "1"), capsys)
    assert code == 2 and "num_generations 1" in err and "advantage 0" in err


REWARD_FILES = {
    # Raises on every sample, so re-calling it one sample at a time finds sample 0.
    "raises": ("def f(prompts, completions, completion_ids, **kw):\n"
               "    return [float(p[-1]['content']) for p in prompts]\n", ["f", "raised ValueError", "on sample 0"]),
    "wrong_count": ("def f(prompts, completions, completion_ids, **kw):\n    return [1.0]\n", ["f", "values"]),
    "missing": ("def g(prompts, completions, completion_ids, **kw):\n    return []\n", ["f", "no function"]),
    "broken": ("raise ImportError('cannot import torchvision')\n", ["torchvision"]),
}


@pytest.mark.parametrize("case", sorted(REWARD_FILES))
def test_reward_function_problems_name_file_and_function(case, start, tmp_path, capsys):
    source, expected = REWARD_FILES[case]
    file = tmp_path / f"{case}.py"
    file.write_text(source)
    args = grpo(start, tmp_path / "o", "--data_path", str(start / "prompts.jsonl"), "--reward_funcs", f"{file}:f")
    if case in ("missing", "broken"):  # found before any tokenising, in this process
        code, err = cli_in_process(args, capsys)
        assert not (tmp_path / "o").exists()
    else:  # found when the rollout first calls the function
        proc = run_cli(args, tmp_path / "cache", check=False)
        code, err = proc.returncode, proc.stderr
    assert code == 2, err[-2000:]
    assert str(file.name) in err and "Traceback" not in err
    for text in expected:
        assert text in err, (text, err[-1000:])


def test_reward_model_with_several_labels_is_refused(start, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(start / "start", num_labels=3)
    rm.save_pretrained(tmp_path / "rm3")
    code, err = cli_in_process(grpo(start, tmp_path / "o", "--data_path", str(start / "prompts.jsonl"),
                                    "--reward_model", str(tmp_path / "rm3")), capsys)
    assert code == 2 and "num_labels 3" in err and str(tmp_path / "rm3") in err
