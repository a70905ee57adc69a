"""Multi-turn tool rollouts: a memorised model's trajectory is token for token the chat template's rendering
of the conversation, its completion mask is 0 exactly on the observation tokens, and the batch layout,
the turn limit and the length limit behave as `sampling.Samples` does."""
from __future__ import annotations

import pytest
import torch

from conftest import SHARED, needs_shared
from minimind_scale.agent.records import read_agent_tasks
from minimind_scale.agent.tools import load_tools
from minimind_scale.agent.trajectory import observation_ids, run_trajectories
from minimind_scale.chat.encoding import encode_prompt
from minimind_scale.chat.markup import TURN_END
from minimind_scale.models.build import load_tokenizer

GENERATION_HEAD = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
CALL = '<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "37 * 43"}}\n</tool_call>'


@pytest.fixture(scope="module")
def agent(tool_memorised_model, one_thread):
    from transformers import AutoModelForCausalLM

    model_dir, tasks_file, tools_file = tool_memorised_model
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(None, str(model_dir))
    task = read_agent_tasks(tasks_file)[0]
    with load_tools(tools_file) as toolbox:
        yield model, tokenizer, task, toolbox


def play(agent, prompts=None, tools=None, **kwargs):
    model, tokenizer, task, toolbox = agent
    kwargs = {"max_turns": 3, "max_new_tokens": 96, "do_sample": False, **kwargs}
    return run_trajectories(model, tokenizer, prompts or [task.messages], tools or [task.tools],
                            kwargs.pop("toolbox", toolbox), end_id=tokenizer.convert_tokens_to_ids(TURN_END),
                            pad_id=tokenizer.pad_token_id, **kwargs)


def real_tokens(samples, row: int) -> list[int]:
    return samples.sequences[row][samples.attention_mask[row].bool()].tolist()


def test_the_trajectory_is_the_template_rendering_and_the_mask_skips_exactly_the_observations(agent):
    model, tokenizer, task, _ = agent
    out = play(agent)
    assert out.messages == [[{"role": "assistant", "content": CALL}, {"role": "tool", "content": '{"result": "1591"}'},
                             {"role": "assistant", "content": "37 * 43 = 1591."}]]
    assert out.tool_calls == [[{"name": "calculate_math", "arguments": {"expression": "37 * 43"}}]]
    assert (out.tool_results, out.tool_failures, out.turns) == ([['{"result": "1591"}']], [0], [2])
    assert (out.unfinished, out.final_answer, out.samples.clipped.tolist()) == ([False], ["37 * 43 = 1591."], [False])

    # The tokenizer's own rendering of the whole conversation, which ends with "<|im_end|>\n" where the
    # trajectory stops at the end-of-turn token.
    full = tokenizer.apply_chat_template(task.messages + out.messages[0], tools=task.tools, tokenize=False)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    row = real_tokens(out.samples, 0)
    assert enc["input_ids"][:len(row)] == row
    assert tokenizer.decode(enc["input_ids"][len(row):]) == "\n"

    # What the model generated: each assistant turn after its header and empty think block, through <|im_end|>.
    spans, pos = [], full.find(GENERATION_HEAD)
    while pos != -1:
        start = pos + len(GENERATION_HEAD)
        end = full.index(TURN_END, start) + len(TURN_END)
        spans.append((start, end))
        pos = full.find(GENERATION_HEAD, end)
    assert len(spans) == 2
    P = out.samples.prompt_len
    assert P == len(encode_prompt(task.messages, task.tools, tokenizer, open_thinking=False))
    expected = [int(any(a <= s and e <= b for a, b in spans)) for s, e in enc["offset_mapping"][P:len(row)]]
    mask = out.samples.completion_mask[0].tolist()
    assert mask == expected
    assert 0 < mask.count(0) < len(mask)  # the observation is there, and masked
    observation = [t for t, m in zip(row[P:], mask) if m == 0]
    assert tokenizer.decode(observation) == ('\n<|im_start|>user\n<tool_response>\n{"result": "1591"}\n'
                                             '</tool_response><|im_end|>\n' + GENERATION_HEAD)
    assert out.samples.attention_mask.all()  # one row: no padding, every token real


def assert_layout(samples, pad_id: int) -> None:
    """Prompts left-padded, continuations right-padded, the completion mask inside the real tokens."""
    P = samples.prompt_len
    for i in range(samples.sequences.shape[0]):
        attn = samples.attention_mask[i].tolist()
        first, last = attn.index(1), len(attn) - 1 - attn[::-1].index(1)
        assert first <= P <= last and all(attn[first:last + 1])  # one contiguous run of real tokens
        assert (samples.sequences[i][~samples.attention_mask[i].bool()] == pad_id).all()
        assert (samples.completion_mask[i] <= samples.attention_mask[i, P:]).all()


def test_batched_rows_are_grouped_by_prompt_and_match_a_lone_trajectory(agent):
    model, tokenizer, task, _ = agent
    alone = real_tokens(play(agent).samples, 0)
    other = [{"role": "user", "content": "Hello, who are you?"}]
    out = play(agent, prompts=[task.messages, other], tools=[task.tools, None], num_samples=2)
    s = out.samples
    assert s.sequences.shape[0] == 4 and s.completion_mask.shape[1] == s.sequences.shape[1] - s.prompt_len
    assert_layout(s, tokenizer.pad_token_id)
    # rows 0, 1 play the task; left padding and mask-derived positions leave them as the lone run
    assert real_tokens(s, 0) == real_tokens(s, 1) == alone
    assert out.final_answer[:2] == ["37 * 43 = 1591."] * 2 and out.tool_results[:2] == [['{"result": "1591"}']] * 2
    # rows 2, 3 share the short prompt, left-padded to the long one's length
    short = encode_prompt(other, None, tokenizer, open_thinking=False)
    assert len(short) < s.prompt_len
    for row in (2, 3):
        assert s.sequences[row, s.prompt_len - len(short):s.prompt_len].tolist() == short
        assert s.attention_mask[row, :s.prompt_len - len(short)].sum() == 0

    torch.manual_seed(0)
    sampled = play(agent, num_samples=3, do_sample=True, temperature=1.0, top_p=0.9, top_k=20)
    assert sampled.samples.sequences.shape[0] == 3 and len(sampled.messages) == 3
    assert_layout(sampled.samples, tokenizer.pad_token_id)
    assert sampled.samples.clipped.tolist() == sampled.unfinished


def test_a_call_at_the_last_turn_is_not_run_and_leaves_the_trajectory_unfinished(agent):
    model, tokenizer, task, _ = agent
    out = play(agent, max_turns=1)
    assert (out.turns, out.unfinished, out.samples.clipped.tolist()) == ([1], [True], [True])
    assert out.tool_calls == [[{"name": "calculate_math", "arguments": {"expression": "37 * 43"}}]]
    assert out.tool_results == [[]] and out.messages == [[{"role": "assistant", "content": CALL}]]
    continuation = real_tokens(out.samples, 0)[out.samples.prompt_len:]
    assert out.samples.completion_mask[0].tolist() == [1] * len(continuation)  # no observation was appended
    assert continuation[-1] == tokenizer.convert_tokens_to_ids(TURN_END)


def test_a_turn_cut_by_max_new_tokens_is_unfinished_and_fully_masked_in(agent):
    model, tokenizer, task, _ = agent
    out = play(agent, max_new_tokens=5)
    assert (out.turns, out.unfinished, out.samples.clipped.tolist()) == ([1], [True], [True])
    assert out.samples.completion_mask.tolist() == [[1] * 5]
    assert out.samples.completion_ids[0, -1] != tokenizer.convert_tokens_to_ids(TURN_END)
    assert out.tool_results == [[]] and out.tool_calls == [[]]  # "<tool_call>\n{..." was cut before its end


def test_a_failed_call_is_an_error_observation_the_model_reads(agent, tmp_path):
    (tmp_path / "other_tools.py").write_text("def other():\n    return 1\n")
    with load_tools(tmp_path / "other_tools.py") as toolbox:
        out = play(agent, toolbox=toolbox, max_turns=2)
    assert out.tool_failures[0] >= 1
    assert out.tool_results[0][0] == '{"error": "unknown tool \'calculate_math\' (tools: other)"}'
    assert out.messages[0][1] == {"role": "tool", "content": out.tool_results[0][0]}


@needs_shared
@pytest.mark.parametrize("open_thinking", [False, True])
def test_observation_tokens_follow_minimind_s_template(open_thinking):
    """With MiniMind's own tokenizer: the newline after the turn, every result in one user turn of
    <tool_response> blocks, and the next generation prompt (an open or an empty think block)."""
    tokenizer = load_tokenizer(str(SHARED / "tokenizers" / "minimind"))
    schemas = [{"type": "function", "function": {"name": "calculate_math", "parameters": {"type": "object"}}}]
    history = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "3 + 4, and 5 * 6?"},
               {"role": "assistant", "content": CALL + "\n" + CALL}]
    results = [{"role": "tool", "content": '{"result": "7"}'}, {"role": "tool", "content": '{"result": "30"}'}]
    ids = observation_ids(tokenizer, history, results, schemas, open_thinking)
    head = "<|im_start|>assistant\n<think>\n" + ("" if open_thinking else "\n</think>\n\n")
    assert tokenizer.decode(ids) == ('\n<|im_start|>user\n<tool_response>\n{"result": "7"}\n</tool_response>\n'
                                     '<tool_response>\n{"result": "30"}\n</tool_response><|im_end|>\n' + head)
    # and they are the template's own tokens of that stretch of the whole conversation
    whole = tokenizer.apply_chat_template(history + results, tools=schemas, tokenize=False, add_generation_prompt=True,
                                          open_thinking=open_thinking)
    whole_ids = tokenizer(whole, add_special_tokens=False)["input_ids"]
    assert whole_ids[-len(ids):] == ids
    assert tokenizer.convert_ids_to_tokens(whole_ids[-len(ids) - 1]) == TURN_END
