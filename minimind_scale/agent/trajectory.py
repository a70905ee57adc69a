"""Multi-turn tool-using rollouts: generate, run the tool calls, show the results, generate again.

Each assistant turn is generated for every still-active trajectory of the batch at once (left-padded,
KV cache on) and cut at its first end-of-turn token. A turn with `<tool_call>` blocks, while turns
remain, has its calls run by the `ToolBox`; the results go back as `tool` turns, and the tokens the
model then reads before its next turn (the observation) are exactly what the tokenizer's chat template
renders between that turn's end-of-turn token and the next generation prompt, found by rendering the
conversation with and without them. A trajectory ends on a turn without calls (finished), on a turn
still calling tools at `max_turns`, or on a turn cut by `max_new_tokens` (both unfinished).

Every turn is generated through the generation seam (minimind_scale/generation), by default transformers'
generate on the policy; the rows are assembled by `sampling.concat_samples`.

The result's `samples` has the layout of `sampling.Samples`, so the online stages score and train on it
as on single-turn samples: the completion is every turn and observation in order, and
`completion_mask` is 1 only on tokens the model generated (each turn's end-of-turn token included).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minimind_scale.agent.tools import ToolBox
from minimind_scale.chat.encoding import encode_prompt
from minimind_scale.chat.markup import TOOL_CALL_CLOSE, TURN_END
from minimind_scale.chat.reply_parser import answer_text
from minimind_scale.chat.tool_calls import ParsedCall, declared_tool_names, parse_tool_calls
from minimind_scale.errors import UserError
from minimind_scale.generation.interface import GenerationBackend, SamplingParams
from minimind_scale.generation.registry import DEFAULT_BACKEND, backend_for
from minimind_scale.rl.sampling import Samples, concat_samples


@dataclass
class Trajectories:
    """Rows grouped by prompt (rows g·n … g·n + n − 1 share prompt g), each list one entry per row."""

    samples: Samples
    messages: list[list[dict]]     # the completion as TRL conversational messages: assistant and tool turns
    tool_calls: list[list[dict]]   # every call the model wrote: {"name", "arguments"} (+ "error" if malformed)
    tool_results: list[list[str]]  # the observation content of each executed call, in order
    tool_failures: list[int]       # executed calls that came back as error observations
    turns: list[int]               # assistant turns
    unfinished: list[bool]         # still calling tools at max_turns, or a turn cut by max_new_tokens
    final_answer: list[str]        # the last turn's text after any </think> and after its last </tool_call>

    def columns(self) -> dict[str, list]:
        """The per-row values as reward-function columns (the `minimind_agent` reward reads some)."""
        return {"tool_calls": self.tool_calls, "tool_results": self.tool_results,
                "tool_failures": self.tool_failures, "turns": self.turns, "unfinished": self.unfinished,
                "final_answer": self.final_answer}


@dataclass
class _Row:
    history: list[dict]  # the prompt, then this row's turns: what the template renders
    tools: list | None
    allowed: set[str]
    think: bool
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)   # the continuation: turns and observations
    mask: list[int] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)
    results: list[str] = field(default_factory=list)
    failures: int = 0
    turns: int = 0
    unfinished: bool = False
    done: bool = False
    final_answer: str = ""


def _render(tokenizer, messages: list[dict], tools: list | None, **kwargs) -> str:
    if tools is not None:
        kwargs["tools"] = tools
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def observation_ids(tokenizer, history: list[dict], tool_messages: list[dict], tools: list | None,
                    open_thinking: bool) -> list[int]:
    """Token ids the template puts between the end-of-turn token of `history`'s last (assistant) turn and
    the model's next generation: the newline after it, the tool turns, the next generation prompt."""
    before = _render(tokenizer, history, tools)
    after = _render(tokenizer, history + tool_messages, tools, add_generation_prompt=True,
                    open_thinking=open_thinking)
    cut = before.rfind(TURN_END) + len(TURN_END)
    if cut < len(TURN_END) or after[:cut] != before[:cut]:
        raise UserError("the tokenizer's chat template does not render a conversation as a prefix of its "
                        "continuation, so tool results cannot be appended to a generated turn")
    return list(tokenizer(after[cut:], add_special_tokens=False)["input_ids"])


def final_answer(turn_text: str) -> str:
    answer = answer_text(turn_text)
    return answer.rsplit(TOOL_CALL_CLOSE, 1)[-1].strip()


def _take_turn(row: _Row, tokens: list[int], ended: bool, last_turn: bool, toolbox: ToolBox, tokenizer) -> None:
    """Record one generated turn; run its calls and append their observation when the trajectory goes on."""
    row.ids += tokens
    row.mask += [1] * len(tokens)
    row.turns += 1
    text = tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=False)
    row.messages.append({"role": "assistant", "content": text})
    row.history.append({"role": "assistant", "content": text})
    row.final_answer = final_answer(text)
    # Calls are read after the thinking: a model may reason about a call's syntax before writing one.
    calls = parse_tool_calls(answer_text(text))
    row.calls += [c.as_dict() for c in calls]
    if not ended or (calls and last_turn):
        row.unfinished = row.done = True
        return
    if not calls:
        row.done = True
        return
    tool_messages = [_execute(row, call, toolbox) for call in calls]
    observation = observation_ids(tokenizer, row.history, tool_messages, row.tools, row.think)
    row.history += tool_messages
    row.messages += tool_messages
    row.ids += observation
    row.mask += [0] * len(observation)


def _execute(row: _Row, call: ParsedCall, toolbox: ToolBox) -> dict:
    result = toolbox.run(call, row.allowed)
    row.results.append(result.content)
    row.failures += not result.ok
    return {"role": "tool", "content": result.content}


def _row_samples(row: _Row) -> Samples:
    """One trajectory as a one-row Samples: its prompt, then every turn and observation."""
    ids = torch.tensor([row.prompt_ids + row.ids], dtype=torch.long)
    return Samples(sequences=ids, attention_mask=torch.ones_like(ids),
                   completion_mask=torch.tensor([row.mask], dtype=torch.long),
                   clipped=torch.tensor([row.unfinished], dtype=torch.bool), prompt_len=len(row.prompt_ids))


@torch.no_grad()
def run_trajectories(model, tokenizer, prompts: list[list[dict]], tools: list[list | None], toolbox: ToolBox, *,
                     num_samples: int = 1, max_turns: int = 3, max_new_tokens: int, do_sample: bool,
                     temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                     open_thinking: list[bool] | None = None, end_id: int, pad_id: int,
                     backend: GenerationBackend | str = DEFAULT_BACKEND) -> Trajectories:
    """`num_samples` trajectories per prompt of up to `max_turns` assistant turns of up to `max_new_tokens`
    tokens each. `tools[g]` is prompt g's tool schemas (None: it may call no tool); `open_thinking[g]`
    renders its generation prompts with an open think block (default False). `model` is the policy or a
    generation backend; `backend` picks one by name (see sampling.sample). The hf backend samples from the
    process's torch RNG; `do_sample` False is greedy."""
    if len(tools) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(tools)} tool lists")
    if max_turns < 1:
        raise ValueError("max_turns must be at least 1")
    thinking = list(open_thinking) if open_thinking is not None else [False] * len(prompts)
    rows = []
    for messages, schemas, think in zip(prompts, tools, thinking):
        ids = encode_prompt(messages, schemas, tokenizer, open_thinking=think)
        rows += [_Row(list(messages), schemas, declared_tool_names(schemas), think, ids) for _ in range(num_samples)]
    generator = backend_for(model, backend, pad_id=pad_id)
    params = SamplingParams(max_new_tokens=max_new_tokens, end_ids=(end_id,),
                            temperature=temperature if do_sample else 0.0, top_p=top_p, top_k=top_k)  # 0: greedy
    for turn in range(max_turns):
        active = [r for r in rows if not r.done]
        if not active:
            break
        out = generator.generate([r.prompt_ids + r.ids for r in active], params)
        for row, tokens, ended in zip(active, out.rows(), out.finished.tolist()):
            _take_turn(row, tokens, ended, turn == max_turns - 1, toolbox, tokenizer)
        device = out.token_ids.device
    samples = concat_samples([_row_samples(r) for r in rows], pad_id).to(device)
    return Trajectories(samples=samples, messages=[r.messages for r in rows],
                        tool_calls=[r.calls for r in rows], tool_results=[r.results for r in rows],
                        tool_failures=[r.failures for r in rows], turns=[r.turns for r in rows],
                        unfinished=[r.unfinished for r in rows], final_answer=[r.final_answer for r in rows])
