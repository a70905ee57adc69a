"""Validation of the online stages (grpo, ppo, agent) on held-out prompts: each stage's `evaluate` reports
exactly its `eval_metric_names`, samples one completion per prompt with the stage's sampling options through
the rollout's backend, and its rewards equal the reward functions applied by hand to completions sampled
again with the same seed; the same seed gives the same numbers, and evaluating inside the engine's RNG fork
leaves training's RNG, rollout count and completion log alone. The agent's pass_rate is the share of tasks
with a gt whose trajectory finished with every gt item in its final answer."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import AGENT_DATA
from minimind_scale.agent.trajectory import run_trajectories
from minimind_scale.chat.markup import TURN_END
from minimind_scale.models.build import build_model, load_tokenizer, save_hf
from minimind_scale.rl.reward_builtins import minimind_agent, minimind_format
from minimind_scale.rl.reward_model import RewardModel
from minimind_scale.stages import agent as agent_stage
from minimind_scale.stages import grpo as grpo_stage
from minimind_scale.stages import ppo as ppo_stage
from minimind_scale.training.context import StageContext

REWARD_FILE = '''
def digit_share(prompts, completions, completion_ids, **columns):
    return [sum(ch.isdigit() for ch in c[0]["content"]) / max(1, len(c[0]["content"])) for c in completions]


def char_count(prompts, completions, completion_ids, **columns):
    return [len(c[0]["content"]) for c in completions]
'''
PROMPTS = [f"Say something about {i}." for i in range(5)]
LOGIT_SCALE = 20.0
SAMPLING = dict(max_gen_len=6, max_prompt_len=32, temperature=1.0, top_p=1.0, top_k=0, seed=3)


def digit_share(completions: list[str]) -> list[float]:
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def char_count(completions: list[str]) -> list[int]:
    """Sensitive to every sampled token, unlike the other rewards on a random model's text."""
    return [len(c) for c in completions]


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "rewards.py"
    path.write_text(REWARD_FILE)
    return path


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tokenizer):
    """A reward model on a tiny random backbone (its score is arbitrary, but deterministic)."""
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("rm")
    torch.manual_seed(1)
    save_hf(build_model("tiny", tokenizer, 32, 1), tokenizer, root / "backbone")
    rm = AutoModelForSequenceClassification.from_pretrained(root / "backbone", num_labels=1)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    return root / "rm"


def random_policy(cfg, tokenizer):
    """The tiny preset at random, its next-token logits scaled up: a fresh model's are nearly flat, so that
    sampling at another temperature would draw the same tokens and go unnoticed."""
    torch.manual_seed(0)
    model = build_model(cfg.model, tokenizer, cfg.hidden_size, cfg.num_hidden_layers)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(LOGIT_SCALE)
    return model


def stage_context(spec, tokenizer, accelerator, out_dir) -> StageContext:
    return StageContext(tokenizer=tokenizer, accelerator=accelerator, out_dir=out_dir, dataset=None,
                        state=spec.state(), evaluating="val")


def held_out_batch(spec, records: list[dict], tokenizer, cfg) -> dict:
    return spec.collate([spec.encode(r, tokenizer, cfg) for r in records], tokenizer, cfg)


def prompt_records() -> list[dict]:
    return [{"conversations": [{"role": "user", "content": p}, {"role": "assistant", "content": ""}]}
            for p in PROMPTS]


def evaluate_as_the_engine_does(spec, model, batch, cfg, ctx) -> dict:
    """The hook under no_grad, in eval mode, inside a torch RNG fork seeded with the run's seed."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(cfg.seed)
        model.eval()
        return spec.evaluate(model, batch, cfg, ctx)


def means(metrics: dict) -> dict[str, float]:
    return {name: float(total) / float(count) for name, (total, count) in metrics.items()}


def resampled_completions(policy, batch: dict, cfg, tokenizer) -> list[str]:
    """One completion per prompt from transformers' generate with the stage's sampling options and the same
    seed, cut before the first end-of-turn token: what evaluation must have scored."""
    end = tokenizer.convert_tokens_to_ids(TURN_END)
    with torch.no_grad():
        torch.manual_seed(cfg.seed)
        out = policy.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              max_new_tokens=cfg.max_gen_len, do_sample=True, temperature=cfg.temperature,
                              top_p=cfg.top_p, top_k=cfg.top_k, eos_token_id=end,
                              pad_token_id=tokenizer.pad_token_id, use_cache=True)
    texts = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        texts.append(tokenizer.decode(row[:row.index(end)] if end in row else row))
    return texts


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, tokenizer, accelerator, reward_file, one_thread):
    cfg = grpo_stage.GRPOConfig(model="tiny", hidden_size=32, num_hidden_layers=1, num_generations=2, beta=0.0,
                                reward_funcs=["minimind_format", f"{reward_file}:digit_share",
                                              f"{reward_file}:char_count"],
                                reward_weights=[0.5, 2.0, 0.1], thinking_ratio=0.5, **SAMPLING)
    model = random_policy(cfg, tokenizer)
    ctx = stage_context(grpo_stage.SPEC, tokenizer, accelerator, tmp_path_factory.mktemp("grpo"))
    model = grpo_stage.SPEC.setup(model, cfg, ctx)
    return model, cfg, ctx, held_out_batch(grpo_stage.SPEC, prompt_records(), tokenizer, cfg)


def test_grpo_reports_the_rewards_of_one_completion_per_prompt_as_scored_by_hand(grpo_run, tokenizer):
    model, cfg, ctx, batch = grpo_run
    metrics = evaluate_as_the_engine_does(grpo_stage.SPEC, model, batch, cfg, ctx)
    assert list(metrics) == grpo_stage.SPEC.eval_metric_names(cfg) == grpo_stage.SPEC.validation_metrics(cfg) == \
        ["reward", "rewards/minimind_format", "rewards/digit_share", "rewards/char_count"]
    assert {name: count for name, (_, count) in metrics.items()} == {name: len(PROMPTS) for name in metrics}

    texts = resampled_completions(model, batch, cfg, tokenizer)
    fmt = minimind_format(None, [[{"role": "assistant", "content": t}] for t in texts])
    digits, chars = digit_share(texts), char_count(texts)
    expected = [0.5 * f + 2.0 * d + 0.1 * c for f, d, c in zip(fmt, digits, chars)]
    got = means(metrics)
    assert got["rewards/minimind_format"] == pytest.approx(sum(fmt) / len(fmt), abs=1e-6)
    assert got["rewards/digit_share"] == pytest.approx(sum(digits) / len(digits), abs=1e-6)
    assert got["rewards/char_count"] == sum(chars) / len(chars)
    assert got["reward"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)
    # Every function applied to every completion, so the total is the weighted sum of the functions' means.
    weighted = 0.5 * got["rewards/minimind_format"] + 2.0 * got["rewards/digit_share"] + 0.1 * got["rewards/char_count"]
    assert got["reward"] == pytest.approx(weighted, abs=1e-5)


def test_the_same_seed_gives_the_same_numbers_and_training_state_is_untouched(grpo_run):
    model, cfg, ctx, batch = grpo_run
    before = torch.get_rng_state()
    first = evaluate_as_the_engine_does(grpo_stage.SPEC, model, batch, cfg, ctx)
    assert torch.equal(torch.get_rng_state(), before)
    assert evaluate_as_the_engine_does(grpo_stage.SPEC, model, batch, cfg, ctx) == first
    assert ctx.state.rollouts == 0 and not (ctx.out_dir / "completions.jsonl").exists()


def test_ppo_measures_the_policy_with_the_reward_model_beside_the_functions(tmp_path, tokenizer, accelerator,
                                                                          reward_file, reward_model_dir, one_thread):
    cfg = ppo_stage.PPOConfig(model="tiny", hidden_size=32, num_hidden_layers=1, kl_coef=0.0,
                              reward_funcs=[f"{reward_file}:char_count"], reward_model=str(reward_model_dir),
                              reward_weights=[1.0, 0.25], thinking_ratio=0.0, **SAMPLING)
    torch.manual_seed(0)
    model = ppo_stage.build_policy_and_critic(cfg, tokenizer)
    with torch.no_grad():
        model.actor.get_output_embeddings().weight.mul_(LOGIT_SCALE)
    ctx = stage_context(ppo_stage.SPEC, tokenizer, accelerator, tmp_path)
    model = ppo_stage.SPEC.setup(model, cfg, ctx)
    batch = held_out_batch(ppo_stage.SPEC, prompt_records(), tokenizer, cfg)
    metrics = evaluate_as_the_engine_does(ppo_stage.SPEC, model, batch, cfg, ctx)
    assert list(metrics) == ppo_stage.SPEC.eval_metric_names(cfg) == \
        ["reward", "rewards/char_count", f"rewards/{RewardModel.name}"]

    texts = resampled_completions(model.actor, batch, cfg, tokenizer)
    scores = RewardModel(str(reward_model_dir), "cpu", cfg.reward_clip).score(batch["prompts"], texts).tolist()
    expected = [c + 0.25 * s for c, s in zip(char_count(texts), scores)]
    got = means(metrics)
    assert metrics["reward"][1] == len(PROMPTS)
    assert got[f"rewards/{RewardModel.name}"] == pytest.approx(sum(scores) / len(scores), abs=1e-5)
    assert got["reward"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)


@pytest.fixture
def agent_run(tmp_path, tool_memorised_model, accelerator, one_thread):
    """The memorised tool-calling model at top_k 1 (its sampling is greedy), on three variants of its task:
    the true gt, a gt it never answers, and no gt."""
    model_dir, tasks_file, tools_file = tool_memorised_model
    tokenizer = load_tokenizer(None, str(model_dir))
    cfg = agent_stage.AgentConfig(model=str(model_dir), tools=str(tools_file), num_generations=2, beta=0.0,
                                  max_gen_len=96, max_turns=3, top_k=1, thinking_ratio=0.0, seed=1)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ctx = stage_context(agent_stage.SPEC, tokenizer, accelerator, tmp_path)
    model = agent_stage.SPEC.setup(model, cfg, ctx)
    task = json.loads((AGENT_DATA / "tasks.jsonl").read_text().splitlines()[0])
    records = [task, {**task, "gt": ["9999"]}, {k: v for k, v in task.items() if k != "gt"}]
    yield model, cfg, ctx, held_out_batch(agent_stage.SPEC, records, tokenizer, cfg), tokenizer
    ctx.state.toolbox.close()


def test_agent_pass_rate_counts_the_tasks_with_a_gt_that_a_finished_trajectory_answers(agent_run):
    model, cfg, ctx, batch, tokenizer = agent_run
    metrics = evaluate_as_the_engine_does(agent_stage.SPEC, model, batch, cfg, ctx)
    assert list(metrics) == agent_stage.SPEC.eval_metric_names(cfg) == \
        ["reward", "rewards/minimind_agent", "pass_rate"]
    assert metrics["reward"][1] == len(batch["prompts"])  # one trajectory per task
    passed, graded = metrics["pass_rate"]
    assert 0.0 <= passed / graded <= 1.0

    # A recount on the same trajectories, played greedily (top_k 1) outside the stage.
    played = run_trajectories(model, tokenizer, batch["prompts"], [c["tools"] for c in batch["columns"]],
                              ctx.state.toolbox, max_turns=cfg.max_turns, max_new_tokens=cfg.max_gen_len,
                              do_sample=False, end_id=tokenizer.convert_tokens_to_ids(TURN_END),
                              pad_id=tokenizer.pad_token_id)
    gts = [c["gt"] for c in batch["columns"]]
    verdicts = [not unfinished and all(g in answer for g in gt) for answer, unfinished, gt in
                zip(played.final_answer, played.unfinished, gts) if gt]
    assert verdicts == [True, False]  # the memorised answer holds 1591, never 9999; the third task has no gt
    assert (passed, graded) == (float(sum(verdicts)), float(len(verdicts)))

    rewards = minimind_agent(batch["prompts"], played.messages, tools=[c["tools"] for c in batch["columns"]],
                             gt=gts, unfinished=played.unfinished, tool_calls=played.tool_calls)
    got = means(metrics)
    assert got["rewards/minimind_agent"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-6)
    assert got["reward"] == pytest.approx(got["rewards/minimind_agent"], abs=1e-6)
    assert evaluate_as_the_engine_does(agent_stage.SPEC, model, batch, cfg, ctx) == metrics
