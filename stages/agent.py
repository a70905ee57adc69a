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
(rl/grpo.py) are the online-RL library's, shared with the grpo stage.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import ClassVar

from pydantic import Field

from minimind_scale import StageSpec, register_stage
from minimind_scale.agent.records import agent_prompt
from minimind_scale.agent.tools import ToolBox, load_tools
from minimind_scale.agent.trajectory import run_trajectories
from minimind_scale.chat.encoding import encode_prompt
from minimind_scale.chat.markup import TURN_END
from minimind_scale.config import OutDir
from minimind_scale.rl import prompts as prompt_rows
from minimind_scale.rl.config import GRPOFamilyConfig
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
    """num_generations trajectories per prompt of one loader batch, scored: the reward functions read the
    trajectory's messages, the reward model its final answer."""
    g = cfg.num_generations
    tools = [c.get("tools") for c in batch["columns"]]
    played = run_trajectories(model, ctx.tokenizer, batch["prompts"], tools, ctx.state.toolbox, num_samples=g,
                              max_turns=cfg.max_turns, max_new_tokens=cfg.max_gen_len, do_sample=True,
                              temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                              open_thinking=[prompt_rows.thinking_open(m, cfg) for m in batch["prompts"]],
                              end_id=ctx.tokenizer.convert_tokens_to_ids(TURN_END),
                              pad_id=ctx.tokenizer.pad_token_id, backend=ctx.state.generator)
    started = time.perf_counter()
    samples = played.samples
    prompts, columns = group_columns(batch, g)
    columns.update(played.columns())
    rewards, per_function = ctx.state.scorer(prompts, played.messages, generated_ids(samples), played.final_answer,
                                             columns)
    texts = [json.dumps(m, ensure_ascii=False) for m in played.messages]
    return ScoredBatch(samples, rewards, per_function, prompts, texts, reward_sec=time.perf_counter() - started,
                       metrics=trajectory_metrics(played))


def trajectory_metrics(played) -> dict[str, tuple[float, float]]:
    """(sum, count) on this process: calls and turns per trajectory, the share of executed calls that
    failed, and the share of trajectories left unfinished."""
    n = float(len(played.turns))
    calls = float(sum(len(c) for c in played.tool_calls))
    executed = float(sum(len(r) for r in played.tool_results))
    return {"tool_calls_per_sample": (calls, n), "tool_failure_ratio": (float(sum(played.tool_failures)), executed),
            "turns_per_sample": (float(sum(played.turns)), n), "unfinished_ratio": (float(sum(played.unfinished)), n)}


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
    state=AgentState,
    packable=False,
    value_columns=prompt_rows.VALUE_COLUMNS,
    data_fields=prompt_rows.DATA_FIELDS,
))
