"""agent: tool-use RL — GRPO on multi-turn trajectories that really call the user's tools.

Each prompt (MiniMind's agent_rl format: a system turn declaring its tools, user turns, `gt`) is played
out num_generations times by agent/trajectory.py: generate; run the turn's `<tool_call>` blocks through
the tools file's functions; append the results as tool turns through the chat template; generate again,
up to max_turns. Observation tokens are masked out of the loss and of the importance ratio; every
assistant turn's end-of-turn token is trained. The reward is the built-in `minimind_agent` trajectory
reward plus any --reward_funcs (which also receive `tool_calls`, `tool_results`, `unfinished`, `turns` and
the record's `tools` and `gt` as columns), then GRPO's group advantages and loss (every --loss_type).

This file holds what is the agent's own: its options, the data mapping, the tool box, and how a group is
produced and scored (playing trajectories). The GRPO family's options (rl/config.py), state and setup
(rl/state.py), the sample -> score -> collect path (rl/rollout.py), the group rollout and the loss
(rl/grpo.py) are the online-RL library's, shared with the grpo stage, and so is validation on held-out
tasks (rl/evaluation.py), to which this stage adds the tool-task pass rate.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import ClassVar

from pydantic import Field

from minimind_scale import StageSpec, register_stage
from minimind_scale.agent.records import agent_prompt, task_passed
from minimind_scale.agent.tools import ToolBox, load_tools
from minimind_scale.agent.trajectory import Trajectories, run_trajectories
from minimind_scale.chat.encoding import encode_prompt
from minimind_scale.chat.markup import TURN_END
from minimind_scale.config import OutDir
from minimind_scale.rl import prompts as prompt_rows
from minimind_scale.rl.config import GRPOFamilyConfig
from minimind_scale.rl.evaluation import EVAL_SAMPLES, evaluate_with, reward_metric_names
from minimind_scale.rl.grpo import group_rollout, loss, steps_per_rollout
from minimind_scale.rl.rollout import ScoredBatch
from minimind_scale.rl.scoring import check_rewards, generated_ids, group_columns
from minimind_scale.rl.state import OnlineRLState, setup_online
from minimind_scale.training.context import Rollout


class AgentConfig(GRPOFamilyConfig):
    """GRPO's options (loss types, group size, KL) on tool-using trajectories; max_gen_len bounds each turn."""

    builtin_reward_funcs: ClassVar[tuple[str, ...]] = ("minimind_agent",)

    tools: str = Field(..., description="Python file whose public functions are the tools (examples/agent_tools.py)")
    out_dir: OutDir = "out/agent"
    max_turns: int = Field(3, ge=1, description="most assistant turns per trajectory")
    tool_timeout_sec: float = Field(1.0, gt=0, description="a tool call running longer is stopped (an error result)")
    max_tool_result_chars: int = Field(2048, ge=1, description="tool results are cut to this many characters")


@dataclass
class AgentState(OnlineRLState):
    """The online-RL state, plus the worker process that runs the tools file's functions."""

    toolbox: ToolBox | None = None


# --------------------------------------------------------------------------- data


def _prompt(record: dict) -> tuple[list[dict], list | None, dict]:
    """agent_prompt's messages and tools, with the tools and gt as reward columns."""
    messages, tools, gt = agent_prompt(record)
    return messages, tools, {"tools": tools, "gt": gt}


def encode_batch(records: list[dict], tokenizer, cfg) -> list:
    """`encode` of each record, through prompts.encode_batch (one tokenizer call for the batch)."""
    return prompt_rows.encode_batch(records, tokenizer, cfg, prompt_of=_prompt)


def encode(record: dict, tokenizer, cfg) -> dict:
    """The prompt (ids only bound its length: each trajectory renders it again), its messages, and as
    reward columns the record's other keys with its tool schemas and gt."""
    messages, tools, gt = agent_prompt(record)
    ids = encode_prompt(messages, tools, tokenizer, open_thinking=prompt_rows.thinking_open(messages, cfg))
    columns = {k: v for k, v in record.items() if k not in prompt_rows.PROMPT_KEYS}
    columns.update(tools=tools, gt=gt)
    return {"prompt_ids": ids[-cfg.max_prompt_len:], "prompt": json.dumps(messages, ensure_ascii=False),
            "columns": json.dumps(columns, ensure_ascii=False)}


# --------------------------------------------------------------------------- set-up and rollout


def check(cfg) -> None:
    check_rewards(cfg)
    load_tools(cfg.tools).close()  # a tools file that does not load stops the run before tokenising


def setup(model, cfg, ctx):
    setup_online(ctx, cfg, policy=model, kl_weight=cfg.beta)
    ctx.state.toolbox = load_tools(cfg.tools, cfg.tool_timeout_sec, cfg.max_tool_result_chars)
    return model


def rollout(model, batches: list[dict], cfg, ctx) -> Rollout:
    return group_rollout(model, batches, cfg, ctx, play_and_score)


def play_and_score(model, batch: dict, cfg, ctx) -> ScoredBatch:
    """num_generations trajectories per prompt of one loader batch, scored, with the trajectory metrics."""
    played = play(model, batch, cfg, ctx, cfg.num_generations)
    return score(played, batch, ctx, cfg.num_generations, trajectory_metrics(played))


def play(model, batch: dict, cfg, ctx, num_samples: int) -> Trajectories:
    """`num_samples` trajectories per prompt of one loader batch, sampled with the stage's options."""
    tools = [c.get("tools") for c in batch["columns"]]
    return run_trajectories(model, ctx.tokenizer, batch["prompts"], tools, ctx.state.toolbox, num_samples=num_samples,
                            max_turns=cfg.max_turns, max_new_tokens=cfg.max_gen_len, do_sample=True,
                            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                            open_thinking=[prompt_rows.thinking_open(m, cfg) for m in batch["prompts"]],
                            end_id=ctx.tokenizer.convert_tokens_to_ids(TURN_END),
                            pad_id=ctx.tokenizer.pad_token_id, backend=ctx.state.generator)


def score(played: Trajectories, batch: dict, ctx, num_samples: int,
          metrics: dict[str, tuple[float, float]]) -> ScoredBatch:
    """Trajectories (`num_samples` per prompt of `batch`) scored: the reward functions read each trajectory's
    messages, the reward model its final answer; `metrics` are the producer's own (sum, count)."""
    started = time.perf_counter()
    samples = played.samples
    prompts, columns = group_columns(batch, num_samples)
    columns.update(played.columns())
    rewards, per_function = ctx.state.scorer(prompts, played.messages, generated_ids(samples), played.final_answer,
                                             columns)
    texts = [json.dumps(m, ensure_ascii=False) for m in played.messages]
    return ScoredBatch(samples, rewards, per_function, prompts, texts, reward_sec=time.perf_counter() - started,
                       metrics=metrics)


def trajectory_metrics(played) -> dict[str, tuple[float, float]]:
    """(sum, count) on this process: calls and turns per trajectory, the share of executed calls that
    failed, and the share of trajectories left unfinished."""
    n = float(len(played.turns))
    calls = float(sum(len(c) for c in played.tool_calls))
    executed = float(sum(len(r) for r in played.tool_results))
    return {"tool_calls_per_sample": (calls, n), "tool_failure_ratio": (float(sum(played.tool_failures)), executed),
            "turns_per_sample": (float(sum(played.turns)), n), "unfinished_ratio": (float(sum(played.unfinished)), n)}


# --------------------------------------------------------------------------- validation


def evaluate(model, batch: dict, cfg, ctx) -> dict[str, tuple[float, float]]:
    """The reward metrics of one trajectory per held-out task, and `pass_rate`: the share of the tasks with a
    gt whose trajectory passes (agent.records.task_passed, the rule `eval-tools` counts by: finished, and
    every gt item in the final answer). Tasks without gt have nothing to pass and are not counted."""
    return evaluate_with(model, batch, cfg, ctx, play_one_and_grade)


def eval_metric_names(cfg) -> list[str]:
    """What `evaluate` reports: the online stages' reward metrics, then pass_rate."""
    return [*reward_metric_names(cfg), "pass_rate"]


def play_one_and_grade(model, batch: dict, cfg, ctx) -> ScoredBatch:
    """EVAL_SAMPLES trajectory per task of a held-out batch, scored, with (tasks passed, tasks with a gt)."""
    played = play(model, batch, cfg, ctx, EVAL_SAMPLES)
    verdicts = [task_passed(answer, unfinished, c.get("gt")) for answer, unfinished, c in
                zip(played.final_answer, played.unfinished, batch["columns"])]
    graded = [v for v in verdicts if v is not None]
    return score(played, batch, ctx, EVAL_SAMPLES, {"pass_rate": (float(sum(graded)), float(len(graded)))})


SPEC = register_stage(StageSpec(
    name="agent",
    help="tool-use RL: GRPO on multi-turn trajectories that call the functions of a tools file",
    config=AgentConfig,
    encode=encode,
    encode_batch=encode_batch,
    collate=prompt_rows.collate,
    loss=loss,
    check=check,
    setup=setup,
    rollout=rollout,
    steps_per_rollout=steps_per_rollout,
    evaluate=evaluate,
    eval_metric_names=eval_metric_names,
    state=AgentState,
    packable=False,
    value_columns=prompt_rows.VALUE_COLUMNS,
    data_fields=prompt_rows.DATA_FIELDS,
))
