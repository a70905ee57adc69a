"""Demo data: deterministic, committed copies current, records valid, demo questions answerable."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from minimind_scale.data.demo_data import DEMO_ANSWERS, DEMO_PROMPTS, generate

ASSETS = Path(__file__).resolve().parents[1] / "minimind_scale" / "assets" / "demo"


def _records(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    a = generate(tmp_path / "a", seed=0)
    b = generate(tmp_path / "b", seed=0)
    c = generate(tmp_path / "c", seed=1)
    assert set(a) == {"pretrain", "sft"}
    for key in a:
        assert a[key].read_bytes() == b[key].read_bytes()
        assert a[key].read_bytes() != c[key].read_bytes()


def test_committed_assets_are_current(tmp_path):
    fresh = generate(tmp_path, seed=0)
    for path in fresh.values():
        committed = ASSETS / path.name
        assert committed.read_bytes() == path.read_bytes(), \
            f"{committed} is stale: run python -m minimind_scale.data.demo_data"


def test_records_are_valid_and_small():
    pretrain = _records(ASSETS / "pretrain.jsonl")
    assert 1000 <= len(pretrain)
    for record in pretrain:
        assert set(record) == {"text"} and isinstance(record["text"], str) and record["text"].strip()

    sft = _records(ASSETS / "sft.jsonl")
    assert 1000 <= len(sft)
    with_system = two_turn = 0
    for record in sft:
        assert set(record) == {"conversations"}
        turns = record["conversations"]
        if turns[0]["role"] == "system":
            with_system += 1
            turns = turns[1:]
        assert len(turns) in (2, 4)
        two_turn += len(turns) == 4
        for i, turn in enumerate(turns):
            assert set(turn) == {"role", "content"}
            assert turn["role"] == ("user", "assistant")[i % 2]
            assert isinstance(turn["content"], str) and turn["content"].strip()
    assert with_system > 0 and two_turn > 0
    for name in ("pretrain.jsonl", "sft.jsonl"):
        assert (ASSETS / name).stat().st_size < 600_000


def test_facts_are_consistent():
    """A question always gets the same answer, or a tiny model could never learn it."""
    answers: dict[str, set[str]] = {}
    for record in _records(ASSETS / "sft.jsonl"):
        turns = [t for t in record["conversations"] if t["role"] != "system"]
        for question, answer in zip(turns[::2], turns[1::2]):
            answers.setdefault(question["content"], set()).add(answer["content"])
    assert all(len(found) == 1 for found in answers.values())


def test_demo_prompts_are_answered_in_sft_data():
    assert len(DEMO_PROMPTS) == len(DEMO_ANSWERS) >= 3
    sft = _records(ASSETS / "sft.jsonl")
    for prompt, keyword in zip(DEMO_PROMPTS, DEMO_ANSWERS):
        replies = [
            turns[i + 1]["content"]
            for record in sft
            for turns in [record["conversations"]]
            for i in range(len(turns) - 1)
            if turns[i]["role"] == "user" and turns[i]["content"] == prompt
        ]
        assert replies, prompt
        assert all(keyword in reply for reply in replies), (prompt, keyword)
