"""The reward stage through the real command line: a Bradley-Terry reward model trained on tiny pairs
(a correct sum chosen over a wrong one), its final/ as a plain sequence classifier, `eval --stage reward`."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import read_metrics, run_cli

SEED = 7
PAIRS = 16
COMMON = ["--max_seq_len", "64", "--dtype", "fp32", "--log_interval", "1", "--num_proc", "1", "--seed", str(SEED),
          "--batch_size", str(PAIRS)]  # one batch holds every pair: step 1's loss is a mean over all of them

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    from minimind_scale.models.build import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="module")
def start_model(tmp_path_factory, tokenizer) -> Path:
    """An untrained tiny causal LM (hidden 64, 2 layers) saved as a Hugging Face directory."""
    from minimind_scale.models.build import build_model, save_hf

    out = tmp_path_factory.mktemp("reward_start") / "lm"
    save_hf(build_model("tiny", tokenizer), tokenizer, out)
    return out


def sum_pairs(margins=None) -> list[dict]:
    """`What is a+b?`: chosen the right sum, rejected one off by 1-3, so which side wins differs per pair
    to an untrained model (no constant token tells them apart)."""
    rng, records = random.Random(0), []
    for i in range(PAIRS):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        prompt = [{"role": "user", "content": f"What is {a}+{b}?"}]
        record = {"chosen": prompt + [{"role": "assistant", "content": f"{a}+{b}={a + b}"}],
                  "rejected": prompt + [{"role": "assistant", "content": f"{a}+{b}={wrong}"}]}
        if margins is not None and margins[i] is not None:
            record["margin"] = margins[i]
        records.append(record)
    return records


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("reward_data") / "pairs.jsonl", sum_pairs())


def score(model, tokenizer, conversation) -> float:
    """One conversation alone (no padding): the score at its last token."""
    ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0, 0].item()


def differences(model, tokenizer, records) -> torch.Tensor:
    """r_chosen − r_rejected per pair, in float64."""
    model.eval()
    return torch.tensor([score(model, tokenizer, r["chosen"]) - score(model, tokenizer, r["rejected"])
                         for r in records], dtype=torch.float64)


@pytest.fixture(scope="module")
def start_differences(start_model, tokenizer) -> torch.Tensor:
    """The scores the run starts from: the start model's backbone with the score head that `set_seed(SEED)`
    initialises, as the engine seeds before it builds the model."""
    from accelerate.utils import set_seed
    from transformers import AutoModelForSequenceClassification

    set_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(str(start_model), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return differences(model, tokenizer, sum_pairs())


def bt_loss(diff: torch.Tensor, margin=0.0) -> float:
    return float((-F.logsigmoid(diff - torch.as_tensor(margin, dtype=torch.float64))).mean())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache, start_model, pairs) -> Path:
    out = tmp_path_factory.mktemp("reward_run")
    run_cli(["reward", "--model", str(start_model), "--data_path", str(pairs), "--out_dir", str(out),
             "--max_steps", "40", "--learning_rate", "3e-3", *COMMON], data_cache)
    return out


def test_first_step_is_bradley_terry_of_the_start_scores(trained, start_differences):
    first = read_metrics(trained)[0]
    assert first["loss"] == pytest.approx(bt_loss(start_differences), abs=1e-5)
    assert first["margin"] == pytest.approx(float(start_differences.mean()), abs=1e-5)
    assert first["accuracy"] == pytest.approx(float((start_differences > 0).double().mean()))


def test_training_logs_reward_metrics_and_final_is_a_sequence_classifier(trained, tokenizer):
    from transformers import AutoModelForSequenceClassification

    from minimind_scale.stages.reward import RewardConfig, build_model

    rows = read_metrics(trained)
    for key in ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected"):
        assert all(key in row and math.isfinite(row[key]) for row in rows), key
    assert rows[-1]["loss"] < 0.3 and rows[-1]["margin"] > 1.0  # from ln 2 at the start
    final = trained / "final"
    model = AutoModelForSequenceClassification.from_pretrained(str(final))
    assert type(model).__name__ == "Qwen3ForSequenceClassification" and model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id
    # final/ holds exactly the trained weights (those of the last checkpoint), score head included.
    saved, trained_weights = load_file(str(final / "model.safetensors")), load_file(
        str(next((trained / "checkpoints").glob("step_*")) / "model.safetensors"))
    assert "score.weight" in saved and saved.keys() == trained_weights.keys()
    assert all(torch.equal(saved[k], trained_weights[k]) for k in saved)
    # An existing reward model is a starting point too: its score head is kept, not re-initialised.
    again = build_model(RewardConfig(model=str(final)), tokenizer)
    assert torch.equal(again.score.weight, model.score.weight)


def test_eval_ranks_the_training_pairs_where_the_untrained_model_does_not(trained, data_cache, tokenizer, pairs,
                                                                           start_differences):
    from transformers import AutoModelForSequenceClassification

    proc = run_cli(["eval", "--stage", "reward", "--model", str(trained / "final"), "--data_path", str(pairs),
                    "--max_seq_len", "64", "--batch_size", "5"], data_cache)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) == {"accuracy", "margin", "pairs"} and out["pairs"] == PAIRS
    assert out["accuracy"] >= 0.8
    untrained = float((start_differences > 0).double().mean())
    assert untrained < 0.8, "the accuracy threshold would not tell a trained model from an untrained one"
    # eval's numbers are those of the saved model, scored one conversation at a time.
    diff = differences(AutoModelForSequenceClassification.from_pretrained(str(trained / "final")), tokenizer,
                       sum_pairs())
    assert out["accuracy"] == pytest.approx(float((diff > 0).double().mean()))
    assert out["margin"] == pytest.approx(float(diff.mean()), abs=1e-4)


def test_eval_refuses_a_model_that_is_not_a_reward_model(capsys, data_cache, start_model, pairs):
    from minimind_scale.errors import UserError
    from minimind_scale.inference.evaluate import EvalConfig, run

    with pytest.raises(UserError, match=f"{start_model}.*num_labels 2"):
        run(EvalConfig(model=str(start_model), data_path=[str(pairs)], stage="reward", cache_dir=str(data_cache)))


def test_margin_shifts_the_loss_as_bradley_terry_with_margin_predicts(tmp_path, data_cache, start_model,
                                                                      start_differences):
    margins = [[None, 0, 0.5, 1][i % 4] for i in range(PAIRS)]  # missing, an int, floats
    data = write_jsonl(tmp_path / "margins.jsonl", sum_pairs(margins))
    run_cli(["reward", "--model", str(start_model), "--data_path", str(data), "--out_dir", str(tmp_path / "run"),
             "--max_steps", "1", *COMMON], data_cache)
    first = read_metrics(tmp_path / "run")[0]
    m = torch.tensor([x or 0.0 for x in margins], dtype=torch.float64)
    assert first["loss"] == pytest.approx(bt_loss(start_differences, m), abs=1e-5)
    assert abs(bt_loss(start_differences, m) - bt_loss(start_differences)) > 0.05  # the margins matter
    assert first["margin"] == pytest.approx(float(start_differences.mean()), abs=1e-5)  # r_c − r_r, no margin


def test_bad_margin_and_preset_are_user_errors(tmp_path, data_cache, start_model):
    good = json.dumps(sum_pairs()[0])
    data = write_jsonl(tmp_path / "bad.jsonl", [good, good.replace("{", '{"margin": "high", ', 1)])
    proc = run_cli(["reward", "--model", str(start_model), "--data_path", str(data), "--out_dir", str(tmp_path / "a"),
                    "--num_proc", "1"], data_cache, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{data}:2: field 'margin'" in proc.stderr

    proc = run_cli(["reward", "--model", "tiny", "--data_path", str(data), "--out_dir", str(tmp_path / "b")],
                   data_cache, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "preset 'tiny'" in proc.stderr and "model directory" in proc.stderr


def test_grpo_takes_the_trained_reward_model(trained, data_cache, start_model, tmp_path):
    """The RLAIF hand-over: the reward stage's final/ is what `grpo --reward_model` scores completions with."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [json.dumps({"prompt": f"{a}+{a}="}) for a in range(4)])
    out = tmp_path / "grpo"
    run_cli(["grpo", "--model", str(start_model), "--data_path", str(prompts), "--out_dir", str(out),
             "--reward_model", str(trained / "final"), "--num_generations", "2", "--batch_size", "2",
             "--max_gen_len", "8", "--max_steps", "2", "--save_interval", "0", *COMMON[:-2]], data_cache)
    rows = read_metrics(out)
    assert len(rows) == 2 and all(abs(r["rewards/reward_model"]) <= 3.0 for r in rows)
    assert rows[0]["reward"] == pytest.approx(rows[0]["rewards/reward_model"], abs=1e-6)  # its only reward


def test_export_rebuilds_a_reward_checkpoint_as_a_sequence_classifier(trained, data_cache, tmp_path, tokenizer):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "exported"
    run_cli(["export", "--checkpoint", str(trained / "checkpoints" / "step_40"), "--out_dir", str(out)], data_cache)
    exported = AutoModelForSequenceClassification.from_pretrained(out)
    final = AutoModelForSequenceClassification.from_pretrained(trained / "final")
    assert type(exported).__name__ == "Qwen3ForSequenceClassification" and exported.config.num_labels == 1
    conversation = sum_pairs()[0]["chosen"]
    assert score(exported, tokenizer, conversation) == pytest.approx(score(final, tokenizer, conversation), abs=1e-5)
