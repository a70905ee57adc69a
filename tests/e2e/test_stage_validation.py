"""Validation during training, stage by stage, through the real command line.

Every offline stage runs a few steps with `--val_size` and `--eval_data_path`. Its eval rows must name
exactly the stage's metrics for every held-out set, and, because a run always evaluates after its last step,
the last row must equal an independent measurement of the weights final/ holds on the same records: the
`eval` command on out_dir/val.jsonl (or the extra file), or the stage's formula recomputed here record by
record, unpadded, from losses/ functions.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import DEMO, cli_output_in_process, read_metrics, run_cli

SEQ = 96
STEPS = 3
TOL = 1e-5  # fp32 throughout: the run and the checks differ only in padding and summation order
COMMON = ["--max_seq_len", str(SEQ), "--dtype", "fp32", "--num_proc", "1", "--seed", "7", "--save_interval", "0",
          "--log_interval", "1", "--max_steps", str(STEPS)]
HELD_OUT = ["--val_size", "8", "--eval_interval", "2"]
LM_METRICS = ("loss", "ppl")

pytestmark = pytest.mark.usefixtures("one_thread")


def demo_lines(name: str, start: int, count: int) -> list[str]:
    return (DEMO / name).read_text().splitlines()[start:start + count]


def as_pairs(lines: list[str]) -> list[str]:
    """Conversations as preference pairs: chosen = the real answer, rejected = the next record's answer."""
    convs = [json.loads(line)["conversations"] for line in lines]
    pairs = []
    for i, conv in enumerate(convs):
        wrong = convs[(i + 1) % len(convs)][-1]["content"]
        wrong = "I do not know." if wrong == conv[-1]["content"] else wrong
        pairs.append(json.dumps({"chosen": conv, "rejected": conv[:-1] + [{"role": "assistant", "content": wrong}]}))
    return pairs


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """Small training and extra held-out files, cut from the bundled demo data."""
    root = tmp_path_factory.mktemp("validation_data")
    contents = {
        "sft": demo_lines("sft.jsonl", 0, 64), "chat": demo_lines("sft.jsonl", 64, 16),
        "pretrain": demo_lines("pretrain.jsonl", 0, 64), "text": demo_lines("pretrain.jsonl", 64, 16),
        "pairs": as_pairs(demo_lines("sft.jsonl", 100, 40)), "extra_pairs": as_pairs(demo_lines("sft.jsonl", 140, 16)),
    }
    paths = {}
    for name, lines in contents.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("\n".join(lines) + "\n")
    return SimpleNamespace(**paths)


@pytest.fixture(scope="module")
def sft_run(files, data_cache) -> Path:
    """A full_sft run of a tiny model (hidden 32, 1 layer) held out on `val`, a conversation set and a set of
    {"text"} pretraining records; its final/ is the start of lora, dpo and reward and distill's teacher."""
    out = files.sft.parent / "sft"
    run_cli(["full_sft", "--data_path", str(files.sft), "--model", "tiny", "--hidden_size", "32",
             "--num_hidden_layers", "1", "--batch_size", "8", "--learning_rate", "3e-3", "--out_dir", str(out),
             "--eval_data_path", f"chat={files.chat}", f"text={files.text}", *HELD_OUT, *COMMON], data_cache)
    return out


def last_eval_row(out: Path, sets: list[str], metrics: tuple[str, ...]) -> dict:
    """The run's last eval row, checked to be after its last step and to name exactly `metrics` per set."""
    rows = [r for r in read_metrics(out) if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in rows] == [2, STEPS]
    expected = {"step", "time/eval_sec"} | {f"eval/{s}/{m}" for s in sets for m in metrics}
    for row in rows:
        assert set(row) == expected
    return rows[-1]


def measured(capsys, model: Path, data: Path, data_cache: Path, *extra: str) -> dict:
    """The `eval` command's result for `model` on `data`, run in this process."""
    args = ["eval", "--model", str(model), "--data_path", str(data), "--max_seq_len", str(SEQ), "--dtype", "fp32",
            "--cache_dir", str(data_cache), *extra]
    code, out, err = cli_output_in_process(args, capsys)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def check_against_eval(row: dict, sets: dict[str, Path], model: Path, data_cache: Path, capsys) -> None:
    """A causal LM's loss per set equals `eval` on that set's file, and ppl is exp(loss)."""
    for name, data in sets.items():
        loss = row[f"eval/{name}/loss"]
        assert row[f"eval/{name}/ppl"] == pytest.approx(math.exp(loss), rel=1e-12)
        assert loss == pytest.approx(measured(capsys, model, data, data_cache)["loss"], abs=TOL), name


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tensors(row: dict, side: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of one encoded row (or one side of a pair), as a batch of one, unpadded."""
    return torch.tensor([row[f"{side}input_ids"]]), torch.tensor([row[f"{side}labels"]])


def test_pretrain(tmp_path, data_cache, files, capsys):
    out = tmp_path / "pretrain"
    run_cli(["pretrain", "--data_path", str(files.pretrain), "--model", "tiny", "--hidden_size", "32",
             "--num_hidden_layers", "1", "--batch_size", "4", "--learning_rate", "3e-3", "--out_dir", str(out),
             "--eval_data_path", f"extra={files.text}", *HELD_OUT, *COMMON], data_cache)
    row = last_eval_row(out, ["val", "extra"], LM_METRICS)
    check_against_eval(row, {"val": out / "val.jsonl", "extra": files.text}, out / "final", data_cache, capsys)


def test_full_sft_with_a_set_of_pretraining_texts(sft_run, data_cache, files, capsys):
    """A set of {"text"} records measures an SFT model as pretrain would (the replay encoding)."""
    row = last_eval_row(sft_run, ["val", "chat", "text"], LM_METRICS)
    sets = {"val": sft_run / "val.jsonl", "chat": files.chat, "text": files.text}
    check_against_eval(row, sets, sft_run / "final", data_cache, capsys)


def test_lora(tmp_path, data_cache, files, sft_run, capsys):
    """final/ holds only the adapter; final/merged/ (merge_lora) is the model measured."""
    out = tmp_path / "lora"
    run_cli(["lora", "--data_path", str(files.sft), "--model", str(sft_run / "final"), "--batch_size", "8",
             "--learning_rate", "1e-2", "--merge_lora", "true", "--out_dir", str(out),
             "--eval_data_path", f"chat={files.chat}", *HELD_OUT, *COMMON], data_cache)
    assert (out / "final" / "adapter_config.json").is_file() and not (out / "final" / "config.json").exists()
    row = last_eval_row(out, ["val", "chat"], LM_METRICS)
    check_against_eval(row, {"val": out / "val.jsonl", "chat": files.chat}, out / "final" / "merged", data_cache,
                       capsys)


def distillation_means(student, teacher, tokenizer, path: Path, alpha: float,
                       temperature: float) -> tuple[float, float]:
    """(mean distillation loss, mean CE) per loss-bearing token over the records of `path`, encoded as given."""
    from minimind_scale.data import sft_rows
    from minimind_scale.data.rows import IGNORE_INDEX
    from minimind_scale.losses.distillation import distillation_loss

    as_given = SimpleNamespace(max_seq_len=SEQ, seed=7, add_system_ratio=0.0, empty_think_ratio=1.0)
    total = ce = tokens = 0.0
    for record in records(path):
        ids, labels = tensors(sft_rows.encode(record, tokenizer, as_given))
        with torch.no_grad():
            loss_sum, ce_sum, _ = distillation_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits,
                                                    labels, alpha, temperature)
        total, ce, tokens = total + loss_sum.item(), ce + ce_sum.item(), tokens + (labels[:, 1:] != IGNORE_INDEX).sum()
    return total / float(tokens), ce / float(tokens)


def test_distill(tmp_path, data_cache, files, sft_run, capsys):
    """loss = alpha·CE + (1 - alpha)·T²·KL per token; ppl = exp(CE per token), which `eval` measures too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, alpha, temperature = tmp_path / "distill", 0.3, 2.0
    run_cli(["distill", "--data_path", str(files.sft), "--teacher", str(sft_run / "final"), "--model", "tiny",
             "--hidden_size", "32", "--num_hidden_layers", "1", "--batch_size", "8", "--learning_rate", "3e-3",
             "--alpha", str(alpha), "--temperature", str(temperature), "--out_dir", str(out),
             "--eval_data_path", f"chat={files.chat}", *HELD_OUT, *COMMON], data_cache)
    row = last_eval_row(out, ["val", "chat"], LM_METRICS)
    student = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(sft_run / "final", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    for name, data in {"val": out / "val.jsonl", "chat": files.chat}.items():
        loss, ce = distillation_means(student, teacher, tokenizer, data, alpha, temperature)
        assert row[f"eval/{name}/loss"] == pytest.approx(loss, abs=TOL), name
        assert row[f"eval/{name}/ppl"] == pytest.approx(math.exp(ce), rel=TOL), name
        assert math.log(row[f"eval/{name}/ppl"]) == pytest.approx(measured(capsys, out / "final", data,
                                                                           data_cache)["loss"], abs=TOL)
        assert abs(loss - ce) > 1e-3  # the KL term weighs in: a loss of CE alone would not pass


def pair_scores(path: Path, tokenizer, score) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) values of `score(input_ids, labels)` for every pair of `path`, encoded by pair_rows."""
    from minimind_scale.data import pair_rows

    chosen, rejected = [], []
    for record in records(path):
        row = pair_rows.encode(record, tokenizer, SimpleNamespace(max_seq_len=SEQ))
        with torch.no_grad():
            chosen.append(score(*tensors(row, "chosen_")))
            rejected.append(score(*tensors(row, "rejected_")))
    return torch.cat(chosen), torch.cat(rejected)


def dpo_measures(policy, reference, tokenizer, path: Path, beta: float) -> dict[str, float]:
    """DPO's mean loss, reward accuracy and reward margin over the pairs of `path`."""
    from minimind_scale.losses.preference import dpo_loss, sequence_logprobs

    def logps(model):
        return pair_scores(path, tokenizer, lambda ids, labels: sequence_logprobs(model(input_ids=ids).logits, labels))

    losses, chosen, rejected = dpo_loss(*logps(policy), *logps(reference), beta)
    return {"loss": losses.mean().item(), "reward_accuracy": (chosen > rejected).float().mean().item(),
            "reward_margin": (chosen - rejected).mean().item()}


@pytest.mark.parametrize("precompute_ref, nproc", [(False, 1), (True, 1), (True, 2)])
def test_dpo(tmp_path, data_cache, files, sft_run, precompute_ref, nproc):
    """The reference scores each held-out set: live, or from tables precomputed per set (a batch's row
    numbers count within its set, so the training table would give other rows' log-probs). Two processes
    score alternate rows of each set and gather its table; 7 held-out pairs split unevenly between them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, beta = tmp_path / "dpo", 0.5
    held_out = ["--val_size", str(9 - nproc), "--eval_interval", "2", "--eval_data_path", f"extra={files.extra_pairs}"]
    proc = run_cli(["dpo", "--data_path", str(files.pairs), "--model", str(sft_run / "final"), "--batch_size",
                    str(4 // nproc), "--learning_rate", "1e-2", "--beta", str(beta), "--precompute_ref",
                    str(precompute_ref).lower(), "--out_dir", str(out), *held_out, *COMMON], data_cache, nproc=nproc)
    # The reference table of `val`, computed or read from the cache, is announced on a line of its own.
    tables = [line for line in proc.stdout.splitlines() if line.startswith("[dpo]") and "set 'val'" in line]
    assert len(tables) == int(precompute_ref)
    row = last_eval_row(out, ["val", "extra"], ("loss", "reward_accuracy", "reward_margin"))
    policy = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(sft_run / "final", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    for name, data in {"val": out / "val.jsonl", "extra": files.extra_pairs}.items():
        expected = dpo_measures(policy, reference, tokenizer, data, beta)
        for metric, value in expected.items():
            assert row[f"eval/{name}/{metric}"] == pytest.approx(value, abs=TOL), (name, metric)
        assert abs(expected["loss"] - math.log(2)) > 1e-3  # the policy has left the reference


def test_reward(tmp_path, data_cache, files, sft_run, capsys):
    """accuracy and margin equal `eval --stage reward`; the loss is Bradley-Terry's, recomputed pair by pair."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from minimind_scale.losses.reward_model import bradley_terry_loss

    out = tmp_path / "reward"
    run_cli(["reward", "--data_path", str(files.pairs), "--model", str(sft_run / "final"), "--batch_size", "4",
             "--learning_rate", "1e-2", "--out_dir", str(out), "--eval_data_path", f"extra={files.extra_pairs}",
             *HELD_OUT, *COMMON], data_cache)
    row = last_eval_row(out, ["val", "extra"], ("loss", "accuracy", "margin"))
    model = AutoModelForSequenceClassification.from_pretrained(out / "final", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    for name, data in {"val": out / "val.jsonl", "extra": files.extra_pairs}.items():
        result = measured(capsys, out / "final", data, data_cache, "--stage", "reward")
        assert row[f"eval/{name}/accuracy"] == pytest.approx(result["accuracy"], abs=TOL), name
        assert row[f"eval/{name}/margin"] == pytest.approx(result["margin"], abs=TOL), name
        chosen, rejected = pair_scores(data, tokenizer, lambda ids, labels: model(input_ids=ids).logits[:, 0])
        assert row[f"eval/{name}/loss"] == pytest.approx(bradley_terry_loss(chosen, rejected).mean().item(), abs=TOL)
        assert row[f"eval/{name}/margin"] == pytest.approx((chosen - rejected).mean().item(), abs=TOL)
