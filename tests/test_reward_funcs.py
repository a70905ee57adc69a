"""Reward functions: MiniMind's rule reward and accuracy on hand-made completions; loading and scoring errors."""
from __future__ import annotations

import textwrap
from types import SimpleNamespace

import pytest
import torch

from minimind_scale.errors import UserError
from minimind_scale.rl.reward_builtins import BUILTIN_REWARDS, accuracy, minimind_format, repetition_penalty
from minimind_scale.rl.reward_funcs import load_reward_funcs
from minimind_scale.rl.reward_scoring import score_completions
from minimind_scale.rl.rollout import Collected, ScoredBatch


def msg(text):
    return [{"role": "assistant", "content": text}]


PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def fmt(text):
    return minimind_format([PROMPT], [msg(text)], [[1, 2, 3]])[0]


# ---------------------------------------------------------------------------------- minimind_format

def test_plain_answer_of_good_length_without_repetition():
    text = "The capital of France is Paris."  # 31 characters; 7 tokens, 5 distinct 3-grams
    assert len(text) == 31
    assert fmt(text) == pytest.approx(0.5)


def test_too_short_and_too_long_answers_lose_the_length_half_point():
    assert fmt("Paris.") == pytest.approx(-0.5)  # 2 tokens: no 3-gram, no penalty
    words = [f"w{i}" for i in range(200)]  # 200 distinct words, 889 characters
    long_text = " ".join(words)
    assert len(long_text) > 800
    assert fmt(long_text) == pytest.approx(-0.5)
    # length is measured after strip(): 14 characters padded to 26 are still too short
    assert fmt("      Paris is nice.\n\n\n\n\n\n") == pytest.approx(-0.5)
    assert fmt("   " + "The capital of France is Paris." + "\n\n") == pytest.approx(0.5)


def test_thinking_of_good_length_once():
    thinking = "I recall that Paris is the capital."  # 35 characters
    answer = "Paris is the capital of France."
    text = f"{thinking}\n</think>\n{answer}"
    # +0.5 length, +1.0 thinking length, +0.25 single </think>, no repetition in the answer
    assert fmt(text) == pytest.approx(0.5 + 1.0 + 0.25)


def test_short_thinking_and_a_second_think_close_are_penalised():
    text = "Hmm.</think>Paris is the capital of France.</think>Yes, Paris is right."
    # +0.5 length (71 chars), -0.5 thinking "Hmm." < 20, -0.25 two </think>;
    # answer = everything after the first </think>, stripped; its 3-grams are all distinct
    answer = "Paris is the capital of France.</think>Yes, Paris is right."
    assert repetition_penalty(answer) == 0.0
    assert fmt(text) == pytest.approx(0.5 - 0.5 - 0.25)


def test_overlong_thinking_gets_minus_half():
    thinking = " ".join(f"t{i}" for i in range(100))  # about 390 characters
    assert len(thinking) > 300
    text = f"{thinking}</think>Paris is the capital of France."
    assert 20 <= len(text) <= 800
    assert fmt(text) == pytest.approx(0.5 - 0.5 + 0.25)


def test_repetition_penalty_hand_values():
    # a b c a b c: 3-grams abc bca cab abc -> 4 grams, 1 repeated -> 1 * 2 * 0.5 / 4
    assert repetition_penalty("a b c a b c") == pytest.approx(0.25)
    # six times "go": 4 grams, 3 repeats -> 0.75, capped at 0.5
    assert repetition_penalty("go go go go go go") == pytest.approx(0.5)
    # punctuation marks are tokens and case is ignored: "Yes , yes , yes ." -> 6 tokens,
    # grams (yes , yes) (, yes ,) (yes , yes) (, yes .) -> 4 grams, 1 repeated -> 0.25
    assert repetition_penalty("Yes, yes, yes.") == pytest.approx(0.25)
    assert repetition_penalty("Yes, yes") == 0.0


def test_repetitive_answer_loses_the_penalty():
    answer = "a b c a b c"  # 11 characters: -0.5 length, -0.25 repetition
    assert fmt(answer) == pytest.approx(-0.75)
    # the penalty looks only at the answer: repetition inside the thinking is free
    thinking = "go go go go go go go go go go"
    text = f"{thinking}</think>The capital of France is Paris."
    assert fmt(text) == pytest.approx(0.5 + 1.0 + 0.25)
    text = f"I recall that Paris is the capital.</think>{'go ' * 10}"
    assert fmt(text) == pytest.approx(0.5 + 1.0 + 0.25 - 0.5)


def test_format_accepts_plain_string_completions():
    assert minimind_format(["q"], ["The capital of France is Paris."], [[1]]) == [pytest.approx(0.5)]


# ----------------------------------------------------------------------------------------- accuracy

def acc(texts, gt):
    return accuracy([PROMPT] * len(texts), [msg(x) for x in texts], [[0]] * len(texts), gt=gt)


def test_accuracy_substring_is_case_insensitive_and_ignores_the_thinking():
    texts = ["Let me think.</think>The answer is PARIS.", "Paris? Lyon?</think>It is Lyon.", "paris"]
    assert acc(texts, ["Paris", "Paris", "Paris"]) == [1.0, 0.0, 1.0]


def test_accuracy_needs_every_item_of_a_list():
    texts = ["Paris, the capital of France", "Paris only"]
    assert acc(texts, [["paris", "france"], ["paris", "france"]]) == [1.0, 0.0]


def test_accuracy_numeric_equality():
    texts = ["</think>so x = 0.50", "The answer is 42", "about 1,000 people", "-3 degrees", "7.0000001"]
    assert acc(texts, [0.5, "4", "1000", -3, "7"]) == [1.0, 0.0, 1.0, 1.0, 1.0]
    assert acc(["The answer is 42"], ["42"]) == [1.0]
    assert acc(["x = 7.01"], [7]) == [0.0]


def test_accuracy_is_none_without_gt():
    texts = ["Paris", "Paris", "Paris"]
    assert acc(texts, [None, [], "paris"]) == [None, None, 1.0]
    assert accuracy([PROMPT], [msg("Paris")], [[0]]) == [None]


def test_builtins_are_listed():
    assert set(BUILTIN_REWARDS) == {"accuracy", "minimind_format", "minimind_agent"}


# ------------------------------------------------------------------------------------------ loading

def write(tmp_path, name, body):
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def test_load_builtins_and_a_file_function(tmp_path):
    p = write(tmp_path, "rewards.py", """
        def length_reward(prompts, completions, completion_ids, **kw):
            return [float(len(ids)) for ids in completion_ids]
        NOT_A_FUNCTION = 3
    """)
    funcs = load_reward_funcs(["minimind_format", f"{p}:length_reward"])
    assert [f.name for f in funcs] == ["minimind_format", "length_reward"]
    assert funcs[1]([PROMPT], [msg("x")], [[1, 2, 3]]) == [3.0]
    # relative to base_dir
    assert load_reward_funcs(["rewards.py:length_reward"], base_dir=tmp_path)[0].name == "length_reward"
    with pytest.raises(UserError, match="NOT_A_FUNCTION is not callable"):
        load_reward_funcs([f"{p}:NOT_A_FUNCTION"])


def test_unknown_name_lists_the_builtins():
    with pytest.raises(UserError) as e:
        load_reward_funcs(["acuracy"])
    assert "acuracy" in str(e.value) and "accuracy, minimind_agent, minimind_format" in str(e.value)
    with pytest.raises(UserError, match="FILE.py:FUNCTION"):
        load_reward_funcs(["rewards.py"])


def test_missing_file_and_missing_function(tmp_path):
    with pytest.raises(UserError, match="reward file not found: .*nope.py"):
        load_reward_funcs([f"{tmp_path}/nope.py:f"])
    p = write(tmp_path, "r.py", "def g(**kw):\n    return []\n")
    with pytest.raises(UserError) as e:
        load_reward_funcs([f"{p}:f"])
    assert str(p) in str(e.value) and "'f'" in str(e.value)


def test_file_that_raises_at_import(tmp_path):
    p = write(tmp_path, "broken.py", "import json\nraise RuntimeError('no config here')\n")
    with pytest.raises(UserError) as e:
        load_reward_funcs([f"{p}:f"])
    assert str(p) in str(e.value)
    assert "RuntimeError: no config here" in str(e.value)
    p = write(tmp_path, "syntax.py", "def f(:\n")
    with pytest.raises(UserError, match="syntax.py failed to import: SyntaxError"):
        load_reward_funcs([f"{p}:f"])


def test_duplicate_names_are_refused(tmp_path):
    p = write(tmp_path, "dup.py", "def accuracy(**kw):\n    return [0.0]\n")
    with pytest.raises(UserError, match="two reward functions are named 'accuracy'"):
        load_reward_funcs(["accuracy", f"{p}:accuracy"])


# ------------------------------------------------------------------------------------------ scoring

COMPLETIONS = [msg("good"), msg("fine"), msg("bad"), msg("ok")]
PROMPTS = [PROMPT] * 4
IDS = [[1], [1, 2], [1, 2, 3], [1, 2, 3, 4]]


def load_one(tmp_path, body, name):
    p = write(tmp_path, f"{name}.py", body)
    return p, load_reward_funcs([f"{p}:{name}"])[0]


def test_function_that_raises_on_sample_2_is_named_with_its_index(tmp_path):
    p, f = load_one(tmp_path, """
        def picky(prompts, completions, completion_ids, **kw):
            out = []
            for c in completions:
                if c[0]["content"] == "bad":
                    raise ValueError("cannot score this one")
                out.append(1.0)
            return out
    """, "picky")
    with pytest.raises(UserError) as e:
        score_completions([f], None, PROMPTS, COMPLETIONS, IDS, {})
    text = str(e.value)
    assert str(p.name) in text and "picky" in text and "sample 2" in text
    assert "ValueError" in text and "cannot score this one" in text and "line 6" in text


def test_wrong_length_non_numeric_and_non_finite_values(tmp_path):
    p, short = load_one(tmp_path, "def short(**kw):\n    return [1.0, 2.0]\n", "short")
    with pytest.raises(UserError) as e:
        score_completions([short], None, PROMPTS, COMPLETIONS, IDS)
    assert p.name in str(e.value) and "short" in str(e.value) and "2 values for 4 completions" in str(e.value)
    p, word = load_one(tmp_path, "def word(**kw):\n    return [1.0, 'high', 0.0, 0.0]\n", "word")
    with pytest.raises(UserError) as e:
        score_completions([word], None, PROMPTS, COMPLETIONS, IDS)
    assert p.name in str(e.value) and "word" in str(e.value) and "non-numeric" in str(e.value)
    _, nan = load_one(tmp_path, "def nan(**kw):\n    return [1.0, float('nan'), 0.0, 0.0]\n", "nan")
    with pytest.raises(UserError, match="must be finite"):
        score_completions([nan], None, PROMPTS, COMPLETIONS, IDS)
    _, scalar = load_one(tmp_path, "def scalar(**kw):\n    return 1.0\n", "scalar")
    with pytest.raises(UserError, match="must return a list"):
        score_completions([scalar], None, PROMPTS, COMPLETIONS, IDS)


def test_weighted_total_skips_none_and_means_exclude_it(tmp_path):
    _, by_len = load_one(tmp_path, """
        def by_len(prompts, completions, completion_ids, **kw):
            return [float(len(ids)) for ids in completion_ids]
    """, "by_len")
    _, sometimes = load_one(tmp_path, """
        def sometimes(prompts, completions, completion_ids, gt, **kw):
            return [None if g is None else (1.0 if c[0]["content"] == g else -1.0) for c, g in zip(completions, gt)]
    """, "sometimes")
    gt = ["good", None, "worse", None]
    total, per = score_completions([by_len, sometimes], [1.0, 0.5], PROMPTS, COMPLETIONS, IDS, {"gt": gt})
    assert per == {"by_len": [1.0, 2.0, 3.0, 4.0], "sometimes": [1.0, None, -1.0, None]}
    assert isinstance(total, torch.Tensor) and total.dtype == torch.float32
    assert total.tolist() == pytest.approx([1 + 0.5, 2.0, 3 - 0.5, 4.0])
    # Each function's logged mean (the rollout's (sum, count), divided once summed over processes).
    rows = len(COMPLETIONS)
    samples = SimpleNamespace(completion_mask=torch.ones(rows, 1), clipped=torch.zeros(rows, dtype=torch.bool))
    metrics = Collected([ScoredBatch(samples, total, per | {"never": [None] * rows}, PROMPTS, [])], {}).metrics()
    assert metrics["rewards/by_len"] == (10.0, 4.0)  # mean 2.5
    assert metrics["rewards/sometimes"] == (0.0, 2.0)  # mean of 1 and -1, not of 1, 0, -1, 0
    assert metrics["rewards/never"] == (0.0, 0.0)  # applied to no sample


def test_builtin_scoring_and_weights_count(tmp_path):
    funcs = load_reward_funcs(["accuracy"])
    total, per = score_completions(funcs, [2.0], PROMPTS, COMPLETIONS, IDS, {"gt": ["GOOD", "x", None, "ok"]})
    assert per["accuracy"] == [1.0, 0.0, None, 1.0]
    assert total.tolist() == [2.0, 0.0, 0.0, 2.0]
    # a record column named like one of the call's own arguments is not passed a second time
    columns = {"gt": ["GOOD", "x", None, "ok"], "completions": ["stale"] * 4}
    assert score_completions(funcs, None, PROMPTS, COMPLETIONS, IDS, columns)[1] == per
    with pytest.raises(UserError, match="reward_weights has 2 values for 1 reward functions"):
        score_completions(funcs, [1.0, 1.0], PROMPTS, COMPLETIONS, IDS)


def test_sample_index_search_reports_a_batch_only_failure_without_an_index(tmp_path):
    _, only_batch = load_one(tmp_path, """
        def only_batch(completions, **kw):
            if len(completions) > 1:
                raise RuntimeError("batch too big")
            return [0.0]
    """, "only_batch")
    with pytest.raises(UserError) as e:
        score_completions([only_batch], None, PROMPTS, COMPLETIONS, IDS)
    assert "batch too big" in str(e.value) and "on sample" not in str(e.value)


def test_infinity_is_refused_with_its_sample(tmp_path):
    _, inf = load_one(tmp_path, "def inf(**kw):\n    return [0.0, float('inf'), 0.0, 0.0]\n", "inf")
    with pytest.raises(UserError, match="returned inf for sample 1"):
        score_completions([inf], None, PROMPTS, COMPLETIONS, IDS)


def test_a_signature_without_kwargs_gets_a_hint(tmp_path):
    body = "def strict(prompts, completions, completion_ids):\n    return [0.0] * 4\n"
    _, strict = load_one(tmp_path, body, "strict")
    with pytest.raises(UserError, match=r"unexpected keyword argument 'gt'.*\*\*kwargs"):
        score_completions([strict], None, PROMPTS, COMPLETIONS, IDS, {"gt": [1, 2, 3, 4]})
