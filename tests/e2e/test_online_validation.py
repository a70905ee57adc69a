"""Validation during training for the online stages (grpo, ppo, agent), through the real command line.

- Names: every eval row of a run holds exactly `eval/<set>/<metric>` for each held-out set and each name of
  the stage's eval_metric_names, and time/eval_sec, at the steps --eval_interval asks for.
- Exactness: the last eval row equals a re-measurement here of the weights final/ holds: the stage's
  `evaluate` over the records of out_dir/val.jsonl and the extra file, in the engine's batches
  (eval_batch_size), inside one torch RNG fork seeded with the run's seed before the first set, `val`.
  `reward` is the weighted sum of the reward functions' means (--reward_weights), as the scorer totals it.
- Isolation: a run measured after every step trains exactly as one without any held-out set (the same
  losses, rollout metrics and final weights, bit for bit).
- best/: --save_best_metric eval/val/reward keeps the maximum of the logged series.
- The agent's pass_rate is what `eval-tools` counts on the tasks with a gt, both playing greedily.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from validation_helpers import logged_evaluations, read_jsonl

from conftest import AGENT_DATA, cli_output_in_process, read_metrics, run_cli
from minimind_scale.config import build_config, parse_flags
from minimind_scale.models.build import build_model, load_tokenizer, save_hf
from minimind_scale.stages import agent as agent_stage
from minimind_scale.stages import grpo as grpo_stage
from minimind_scale.stages import ppo as ppo_stage
from minimind_scale.training.context import StageContext

pytestmark = pytest.mark.usefixtures("one_thread")

REWARD_FILE = '''
def digit_share(prompts, completions, completion_ids, **columns):
    return [sum(ch.isdigit() for ch in c[0]["content"]) / max(1, len(c[0]["content"])) for c in completions]


def char_count(prompts, completions, completion_ids, **columns):
    """Sensitive to every sampled token, unlike the other rewards on a random model's text."""
    return [len(c[0]["content"]) for c in completions]
'''
WEIGHTS = {"minimind_format": 0.5, "digit_share": 2.0, "char_count": 0.1}
STEPS = 4
# fp32 throughout; an evaluation's rewards are float32 sums of a few values.
TOL = 1e-6
COMMON = ["--max_gen_len", "8", "--max_prompt_len", "32", "--temperature", "1.0", "--top_p", "1.0", "--top_k", "0",
          "--batch_size", "2", "--max_steps", str(STEPS), "--log_interval", "1", "--dtype", "fp32", "--num_proc", "1",
          "--seed", "3", "--save_interval", "0"]
# Not the training batch size, so that a run ignoring it would sample other batches.
HELD_OUT = ["--val_size", "4", "--eval_interval", "2", "--eval_batch_size", "3"]
# What the clock, not the model, decides in a training row.
TIMING_KEYS = ("tokens_per_sec", "input_tokens_per_sec", "elapsed_sec", "peak_mem_mb")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """A start policy (hidden 32, 1 layer, saved), 12 training prompts with a gt, 3 extra held-out prompts
    without one, and a reward file."""
    root = tmp_path_factory.mktemp("online_validation")
    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    save_hf(build_model("tiny", tokenizer, 32, 1), tokenizer, root / "start")
    prompts = [prompt_record(f"Say something about {i}.", gt=[str(i)]) for i in range(12)]
    extra = [prompt_record(f"Count to {i}.") for i in range(3)]
    for name, records in (("prompts", prompts), ("extra", extra)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "rewards.py").write_text(REWARD_FILE)
    return SimpleNamespace(start=root / "start", prompts=root / "prompts.jsonl", extra=root / "extra.jsonl",
                           rewards=root / "rewards.py")


def prompt_record(question: str, **keys) -> dict:
    """MiniMind's rlaif layout: the conversation ends with a placeholder assistant turn."""
    return {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": ""}], **keys}


def online_args(stage: str, files, out: Path, *extra: str) -> list[str]:
    """A run of `stage` from the start policy, rewarded by the three weighted functions of WEIGHTS."""
    rewards = ["minimind_format", f"{files.rewards}:digit_share", f"{files.rewards}:char_count"]
    return [stage, "--model", str(files.start), "--data_path", str(files.prompts), "--out_dir", str(out),
            "--reward_funcs", *rewards, "--reward_weights", *map(str, WEIGHTS.values()), *COMMON, *extra]


def grpo_args(files, out: Path, *extra: str) -> list[str]:
    return online_args("grpo", files, out, "--num_generations", "2", "--learning_rate", "5e-2", *extra)


def ppo_args(files, out: Path, *extra: str) -> list[str]:
    return online_args("ppo", files, out, "--learning_rate", "5e-2", "--critic_learning_rate", "1e-2", *extra)


def config_of(spec, args: list[str]):
    """The stage's config as the command line builds it from `args` (the stage name first)."""
    return build_config(spec.config, parse_flags(args[1:], spec.config))


@pytest.fixture(scope="module")
def grpo_validated(files, data_cache) -> tuple[Path, list[str]]:
    """(out_dir, args) of a grpo run held out on `val` (4 prompts) and `extra`, measured every 2 steps,
    keeping best/ by the held-out reward."""
    out = files.start.parent / "grpo_validated"
    args = grpo_args(files, out, *HELD_OUT, "--eval_data_path", f"extra={files.extra}",
                     "--save_best_metric", "eval/val/reward")
    run_cli(args, data_cache)
    return out, args


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def eval_rows_checked(out: Path, spec, cfg, sets: list[str], steps: list[int]) -> dict[int, dict]:
    """{step: eval row}, checked to be at `steps` and to hold exactly every metric of every set, all finite."""
    rows = logged_evaluations(out)
    assert sorted(rows) == steps
    expected = {"step", "time/eval_sec"} | {f"eval/{s}/{m}" for s in sets for m in spec.eval_metric_names(cfg)}
    for step, row in rows.items():
        assert set(row) == expected, step
        assert all(math.isfinite(v) for v in row.values()), row
    return rows


def policy_from(spec, cfg, model_dir: Path, tokenizer):
    """The model the stage trains, built as the run builds it but from `model_dir` (a run's final/, with
    PPO's critic in its critic/: evaluation does not use it, loading it only spares a new value head)."""
    critic = {"critic": str(model_dir / "critic")} if (model_dir / "critic").is_dir() else {}
    cfg = cfg.model_copy(update={"model": str(model_dir), **critic})
    if spec.build_model is not None:
        return spec.build_model(cfg, tokenizer)
    return build_model(cfg.model, tokenizer)


def remeasured(spec, cfg, model_dir: Path, sets: dict[str, list[dict]], accelerator, scratch: Path) -> dict:
    """{eval/<set>/<metric>: value} of the model in `model_dir` on `sets` (records, in order), measured as
    validation does: the stage's state set up afresh, every set encoded as given and cut into batches of
    eval_batch_size (default batch_size), the stage's `evaluate` summed over them, all sets inside one RNG
    fork seeded once with the run's seed, without gradients, in eval mode."""
    tokenizer = load_tokenizer(None, str(model_dir))
    eval_cfg = cfg.model_copy(update={"packing": False, **spec.eval_overrides})
    ctx = StageContext(tokenizer=tokenizer, accelerator=accelerator, out_dir=scratch, dataset=None,
                       state=spec.state())
    model = spec.setup(policy_from(spec, cfg, model_dir, tokenizer), eval_cfg, ctx)
    batch_size = cfg.eval_batch_size or cfg.batch_size
    results = {}
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(cfg.seed)
        model.eval()
        for name, records in sets.items():
            rows = [spec.encode(r, tokenizer, eval_cfg) for r in records]
            set_ctx = dataclasses.replace(ctx, evaluating=name, dataset=rows)
            sums: dict[str, list[float]] = {}
            for start in range(0, len(rows), batch_size):
                batch = spec.collate(rows[start:start + batch_size], tokenizer, eval_cfg)
                measured = spec.evaluate(model, batch, eval_cfg, set_ctx)
                for metric, (total, count) in measured.items():
                    pair = sums.setdefault(metric, [0.0, 0.0])
                    pair[0], pair[1] = pair[0] + float(total), pair[1] + float(count)
            results.update({f"eval/{name}/{metric}": total / count for metric, (total, count) in sums.items()})
    return results


def check_reward_totals(row: dict, sets: list[str]) -> None:
    """Every completion gets every function, so each set's reward is the weighted sum of the functions' means."""
    for name in sets:
        weighted = sum(w * row[f"eval/{name}/rewards/{fn}"] for fn, w in WEIGHTS.items())
        assert row[f"eval/{name}/reward"] == pytest.approx(weighted, abs=TOL), name


def check_against_remeasurement(out: Path, spec, cfg, extra: Path, accelerator, scratch: Path) -> None:
    """The last eval row equals the re-measurement of final/ on val.jsonl then `extra`."""
    rows = logged_evaluations(out)
    row = rows[max(rows)]
    sets = {"val": read_jsonl(out / "val.jsonl"), "extra": read_jsonl(extra)}
    assert len(sets["val"]) == 4
    again = remeasured(spec, cfg, out / "final", sets, accelerator, scratch)
    logged = {k: v for k, v in row.items() if k.startswith("eval/")}
    assert set(again) == set(logged)
    for key, value in logged.items():
        assert value == pytest.approx(again[key], abs=TOL), key


def test_grpo_logs_every_reward_per_set_and_its_last_evaluation_remeasures_final(grpo_validated, files,
                                                                                 accelerator, tmp_path):
    out, args = grpo_validated
    cfg = config_of(grpo_stage.SPEC, args)
    assert grpo_stage.SPEC.eval_metric_names(cfg) == \
        ["reward", "rewards/minimind_format", "rewards/digit_share", "rewards/char_count"]
    rows = eval_rows_checked(out, grpo_stage.SPEC, cfg, ["val", "extra"], [2, STEPS])
    for row in rows.values():
        check_reward_totals(row, ["val", "extra"])
    # The policy moves between evaluations, so matching the last one says which weights were measured.
    assert rows[2]["eval/val/reward"] != rows[STEPS]["eval/val/reward"]
    check_against_remeasurement(out, grpo_stage.SPEC, cfg, files.extra, accelerator, tmp_path)


def test_best_by_the_held_out_reward_keeps_its_maximum(grpo_validated):
    out, _ = grpo_validated
    series = {step: row["eval/val/reward"] for step, row in logged_evaluations(out).items()}
    assert len(set(series.values())) > 1  # a minimum would be another step
    best = json.loads((out / "best" / "best_metric.json").read_text())
    top = max(series.values())
    assert best["metric"] == "eval/val/reward" and best["mode"] == "max"
    assert best["value"] == top and best["step"] == min(s for s, v in series.items() if v == top)
    row = logged_evaluations(out)[best["step"]]
    assert best["eval"] == {k: v for k, v in row.items() if k.startswith("eval/")}
    assert (out / "best" / "config.json").is_file()


def training_rows(out: Path) -> list[dict]:
    """The metrics.jsonl rows of training steps, less what the clock decides."""
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k not in TIMING_KEYS}
            for r in read_metrics(out) if not any(k.startswith("eval/") for k in r)]


def test_evaluating_after_every_step_leaves_grpo_training_unchanged(files, data_cache, tmp_path):
    """Measured on an extra set after every step (no --val_size, which would take records from training),
    the run samples, scores and trains exactly as one without a held-out set."""
    from safetensors.torch import load_file

    plain, measured = tmp_path / "plain", tmp_path / "measured"
    run_cli(grpo_args(files, plain), data_cache)
    run_cli(grpo_args(files, measured, "--eval_data_path", f"extra={files.extra}", "--eval_interval", "1"),
            data_cache)
    assert sorted(logged_evaluations(measured)) == list(range(1, STEPS + 1)) and not logged_evaluations(plain)
    expected = training_rows(plain)
    assert [r["step"] for r in expected] == list(range(1, STEPS + 1))
    for a, b in zip(expected, training_rows(measured), strict=True):
        assert a == b, a["step"]
    weights, trained = (load_file(out / "final" / "model.safetensors") for out in (plain, measured))
    assert weights.keys() == trained.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, trained[name]), name


def test_ppo_logs_every_reward_of_val_and_its_last_evaluation_remeasures_final(files, data_cache, accelerator,
                                                                              tmp_path):
    out = tmp_path / "ppo"
    args = ppo_args(files, out, *HELD_OUT, "--eval_data_path", f"extra={files.extra}")
    run_cli(args, data_cache)
    cfg = config_of(ppo_stage.SPEC, args)
    rows = eval_rows_checked(out, ppo_stage.SPEC, cfg, ["val", "extra"], [2, STEPS])
    for row in rows.values():
        check_reward_totals(row, ["val", "extra"])
    check_against_remeasurement(out, ppo_stage.SPEC, cfg, files.extra, accelerator, tmp_path / "scratch")


@pytest.fixture
def agent_tasks(tmp_path) -> tuple[Path, Path]:
    """(held-out tasks, the ones with a gt): the memorised task, the same with a gt it never answers, and
    the same without a gt (nothing to pass, so not counted)."""
    task = json.loads((AGENT_DATA / "tasks.jsonl").read_text().splitlines()[0])
    graded = [task, {**task, "gt": ["9999"]}]
    held_out, with_gt = tmp_path / "held_out_tasks.jsonl", tmp_path / "graded_tasks.jsonl"
    held_out.write_text("".join(json.dumps(t) + "\n" for t in [*graded, {k: v for k, v in task.items() if k != "gt"}]))
    with_gt.write_text("".join(json.dumps(t) + "\n" for t in graded))
    return held_out, with_gt


def test_agent_pass_rate_is_what_eval_tools_counts_on_the_tasks_with_a_gt(tmp_path, data_cache, tool_memorised_model,
                                                                          agent_tasks, capsys):
    """Both play greedily (top_k 1 here, do_sample off there), one task per batch, without a think block."""
    model, tasks, tools = tool_memorised_model
    held_out, with_gt = agent_tasks
    out = tmp_path / "agent"
    max_gen_len, max_turns = 128, 3
    args = ["agent", "--model", str(model), "--data_path", str(tasks), "--tools", str(tools), "--out_dir", str(out),
            "--num_generations", "2", "--batch_size", "1", "--max_gen_len", str(max_gen_len), "--max_turns",
            str(max_turns), "--top_k", "1", "--thinking_ratio", "0", "--learning_rate", "1e-6", "--max_steps", "2",
            "--log_interval", "1", "--dtype", "fp32", "--num_proc", "1", "--seed", "1", "--save_interval", "0",
            "--eval_data_path", f"tasks={held_out}", "--eval_interval", "1"]
    run_cli(args, data_cache)
    cfg = config_of(agent_stage.SPEC, args)
    assert agent_stage.SPEC.eval_metric_names(cfg) == ["reward", "rewards/minimind_agent", "pass_rate"]
    rows = eval_rows_checked(out, agent_stage.SPEC, cfg, ["tasks"], [1, 2])
    pass_rate = rows[2]["eval/tasks/pass_rate"]
    assert 0.0 <= pass_rate <= 1.0
    assert rows[2]["eval/tasks/reward"] == pytest.approx(rows[2]["eval/tasks/rewards/minimind_agent"], abs=TOL)

    code, stdout, err = cli_output_in_process(
        ["eval-tools", "--model", str(out / "final"), "--data_path", str(with_gt), "--tools", str(tools),
         "--max_turns", str(max_turns), "--max_new_tokens", str(max_gen_len), "--batch_size", "1", "--dtype", "fp32"],
        capsys)
    assert code == 0, err
    recount = json.loads(stdout.strip().splitlines()[-1])
    assert recount["tasks"] == 2 and recount["accuracy"] == 0.5  # the memorised answer holds 1591, never 9999
    assert pass_rate == recount["accuracy"]
