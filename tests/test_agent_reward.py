"""The minimind_agent reward on hand-made trajectories: each rule of MiniMind's calculate_rewards, by value."""
from __future__ import annotations

import json

import pytest

from conftest import AGENT_DATA
from minimind_scale.rl.reward_builtins import BUILTIN_REWARDS, minimind_agent, repetition_penalty
from minimind_scale.rl.reward_funcs import load_reward_funcs
from minimind_scale.rl.reward_scoring import score_completions

SCHEMAS = json.loads((AGENT_DATA / "schemas.json").read_text())
CALC = [s for s in SCHEMAS if s["function"]["name"] == "calculate_math"]
PROMPT = [{"role": "user", "content": "What is 37 * 43?"}]


def call_text(name="calculate_math", **arguments):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def trajectory(*turns):
    """Assistant turns with a tool turn after every one but the last."""
    out = []
    for i, turn in enumerate(turns):
        out.append({"role": "assistant", "content": turn})
        if i < len(turns) - 1:
            out.append({"role": "tool", "content": '{"result": "1591"}'})
    return out


def reward(completion, gt=("1591",), tools=SCHEMAS, unfinished=False, tool_calls=None, **columns):
    cols = {"gt": [list(gt) if gt is not None else None], "tools": [tools], "unfinished": [unfinished], **columns}
    if tool_calls is not None:
        cols["tool_calls"] = [tool_calls]
    return minimind_agent([PROMPT], [completion], [[1, 2]], **cols)[0]


GOOD_CALL = call_text(expression="37 * 43")
ANSWER = "37 * 43 = 1591."  # six tokens, no repeated 3-gram


def test_a_good_trajectory_earns_alignment_and_the_ground_truth():
    # +0.5 (one valid call for one gt item) + 2.5 (gt found) = 3.0, the cap
    assert reward(trajectory(GOOD_CALL, ANSWER)) == pytest.approx(3.0)
    # calls taken from the tool_calls column give the same as calls parsed from the turns
    calls = [{"name": "calculate_math", "arguments": {"expression": "37 * 43"}}]
    assert reward(trajectory(GOOD_CALL, ANSWER), tool_calls=calls) == pytest.approx(3.0)
    # the schemas as JSON text (MiniMind's data) and a plain-text completion are read too
    assert reward(trajectory(GOOD_CALL, ANSWER), tools=json.dumps(CALC)) == pytest.approx(3.0)
    assert reward(GOOD_CALL + "\n" + ANSWER) == pytest.approx(3.0)


def test_gap_between_valid_calls_and_the_expected_count():
    # two gt items, one valid call, one item found: -0.5·|1 − 2| + 2.5·1/2
    assert reward(trajectory(GOOD_CALL, ANSWER), gt=["1591", "Paris"]) == pytest.approx(-0.5 + 1.25)
    # two valid calls for one gt item: gap 1
    assert reward(trajectory(GOOD_CALL + "\n" + GOOD_CALL, ANSWER)) == pytest.approx(-0.5 + 2.5)


def test_invalid_calls_count_twice_in_the_gap():
    # a required argument empty: valid 0, gap |0 − 1| + 1 invalid = 2
    assert reward(trajectory(call_text(expression=""), ANSWER)) == pytest.approx(-1.0 + 2.5)
    assert reward(trajectory(call_text(expression="   "), ANSWER)) == pytest.approx(-1.0 + 2.5)
    assert reward(trajectory(call_text(), ANSWER)) == pytest.approx(-1.0 + 2.5)  # missing
    # a tool the sample does not declare (the schemas list only calculate_math)
    assert reward(trajectory(call_text("get_current_weather", location="Paris"), ANSWER), tools=CALC) == \
        pytest.approx(-1.0 + 2.5)
    # no schemas at all: nothing is declared
    assert reward(trajectory(GOOD_CALL, ANSWER), tools=None) == pytest.approx(-1.0 + 2.5)
    # a malformed block, as the trajectory records it
    bad = [{"name": None, "arguments": None, "error": "the tool call is not valid JSON"}]
    assert reward(trajectory(GOOD_CALL, ANSWER), tool_calls=bad) == pytest.approx(-1.0 + 2.5)
    # arguments as JSON text are read; broken JSON text is invalid
    as_text = [{"name": "calculate_math", "arguments": '{"expression": "37 * 43"}'}]
    assert reward(trajectory(GOOD_CALL, ANSWER), tool_calls=as_text) == pytest.approx(3.0)
    broken = [{"name": "calculate_math", "arguments": '{"expression": '}]
    assert reward(trajectory(GOOD_CALL, ANSWER), tool_calls=broken) == pytest.approx(-1.0 + 2.5)


def test_zero_and_false_are_given_arguments():
    calls = [{"name": "unit_converter", "arguments": {"value": 0, "from_unit": "km", "to_unit": "miles"}}]
    assert reward(trajectory(GOOD_CALL, "It is 0 miles."), gt=["0"], tool_calls=calls) == pytest.approx(3.0)
    calls[0]["arguments"]["value"] = None
    assert reward(trajectory(GOOD_CALL, "It is 0 miles."), gt=["0"], tool_calls=calls) == pytest.approx(1.5)


def test_the_final_text_follows_the_last_tool_call_and_the_thinking():
    # the ground truth inside the call or the thinking earns nothing: only the text after them counts
    last = "<think>\nthe answer is 1591\n</think>\n\n" + call_text(expression="1591") + "\nI do not know."
    assert reward(trajectory(last)) == pytest.approx(0.5 + 0.0)
    # numbers match as numbers: 1591 is not found in 15910
    assert reward(trajectory(GOOD_CALL, "It is 15910.")) == pytest.approx(0.5)
    assert reward(trajectory(GOOD_CALL, "It is 1,591.")) == pytest.approx(3.0)


def test_an_unfinished_trajectory_gets_no_answer_credit_and_a_penalty():
    # still calling at max_turns: the final text is empty; the repetition penalty reads the last answer
    penalty = repetition_penalty(GOOD_CALL)  # '"', ':', '"' repeats in the call's JSON
    assert penalty > 0
    value = reward(trajectory(GOOD_CALL, GOOD_CALL), unfinished=True)
    assert value == pytest.approx(-0.5 + 0.0 - 0.5 - penalty)  # two valid calls for one gt item: gap 1
    # the same trajectory finished would have been read for the answer (here: none in it)
    assert reward(trajectory(GOOD_CALL, GOOD_CALL + " 1591"), unfinished=False) == pytest.approx(-0.5 + 2.5)


def test_unbalanced_tool_call_tags_cost_half_a_point_per_turn():
    # an unclosed block is no call: the no-call branch scores it (+0.5 length), −0.5 for the tag
    text = 'I will call it <tool_call>{"name": "calculate_math"'
    assert reward(trajectory(text)) == pytest.approx(-0.5 + 0.5)
    # two unbalanced turns in a calling trajectory: −1.0
    turns = trajectory(GOOD_CALL + "</tool_call>", GOOD_CALL + "<tool_call>", ANSWER)
    assert reward(turns) == pytest.approx(-1.0 + (-0.5 * 1) + 2.5)


def test_without_calls_minimind_s_format_score():
    assert reward(trajectory("The capital of France is Paris.")) == pytest.approx(0.5)
    assert reward(trajectory("Paris")) == pytest.approx(0.5)  # 5 characters is long enough here (20 in GRPO)
    assert reward(trajectory("Hi.")) == pytest.approx(-0.5)
    thinking = "I recall that Paris is the capital.\n</think>\nParis is the capital of France."
    assert reward(trajectory(thinking)) == pytest.approx(0.5 + 1.0 + 0.25)
    assert reward(trajectory("go go go go go go")) == pytest.approx(0.5 - 0.5)  # the repetition penalty


def test_the_total_is_clipped_to_three():
    junk = "\n".join([call_text("nope")] * 6)  # six invalid calls: gap 1 + 6 = 7 → −3.5
    assert reward(trajectory(junk, "<tool_call>"), unfinished=True) == pytest.approx(-3.0)


def test_registered_and_scored_with_record_columns():
    assert "minimind_agent" in BUILTIN_REWARDS
    funcs = load_reward_funcs(["minimind_agent"])
    completions = [trajectory(GOOD_CALL, ANSWER), trajectory("The capital of France is Paris.")]
    columns = {"gt": [["1591"], []], "tools": [SCHEMAS, SCHEMAS], "unfinished": [False, False],
               "tool_calls": [[{"name": "calculate_math", "arguments": {"expression": "37 * 43"}}], []]}
    total, per_function = score_completions(funcs, None, [PROMPT, PROMPT], completions, [[1], [2]], columns)
    assert total.tolist() == pytest.approx([3.0, 0.5])
    assert per_function["minimind_agent"] == pytest.approx([3.0, 0.5])
