"""Property-based checks of record validation (hypothesis).

Any JSON object a user may put on a line must either encode or be refused with a RecordError that
names a field: never another exception, which inside a tokenisation worker would surface as a
traceback. And a single corrupted line anywhere in a file is reported by `prepare` with exit code 2
and its file:line.
"""
from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cli_in_process
from minimind_scale.data.rows import IGNORE_INDEX
from minimind_scale.errors import RecordError
from minimind_scale.models.build import load_tokenizer
from minimind_scale.training import registry

KEYS = ["text", "conversations", "messages", "role", "content", "reasoning_content", "tools", "tool_calls", "chosen",
        "rejected", "name", "arguments", "function"]
ROLES = ["system", "user", "assistant", "tool", "User", "bot", ""]
scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.sampled_from(ROLES) \
    | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), inner, max_size=4),
                           max_leaves=20)
message = st.fixed_dictionaries({"role": st.sampled_from(ROLES) | json_values,
                                 "content": json_values | st.text(max_size=20)})
records = (st.dictionaries(st.sampled_from(KEYS), json_values, max_size=4)
           | st.fixed_dictionaries({"conversations": st.lists(message, max_size=4)})
           | st.fixed_dictionaries({"chosen": st.lists(message, max_size=3), "rejected": st.lists(message, max_size=3)})
           | st.fixed_dictionaries({"text": json_values}))

plain_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40)


@functools.lru_cache(maxsize=1)
def shipped_tokenizer():
    return load_tokenizer(None)


def stage_config(name: str, max_seq_len: int = 128):
    registry.discover([])
    spec = registry.get_stage(name)
    return spec, spec.config(max_seq_len=max_seq_len)


@pytest.mark.parametrize("stage", ["pretrain", "full_sft", "dpo"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=records)
def test_any_record_encodes_or_names_its_field(stage, record):
    spec, cfg = stage_config(stage)
    try:
        encoded = spec.encode(record, shipped_tokenizer(), cfg)
    except RecordError as e:
        assert e.field and e.reason
        return
    for column in encoded.values():
        assert all(isinstance(t, int) for t in column) and len(column) <= cfg.max_seq_len


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=st.lists(st.tuples(plain_text, plain_text), min_size=1, max_size=3), system=st.none() | plain_text)
def test_well_formed_conversations_always_encode_with_loss_tokens(turns, system):
    # Long enough for any generated conversation (a character is at most 4 byte-level tokens).
    spec, cfg = stage_config("full_sft", max_seq_len=4096)
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    try:
        encoded = spec.encode({"conversations": messages}, shipped_tokenizer(), cfg)
    except RecordError as e:  # only chat control markers typed into the text may be refused
        assert "marker" in e.reason, e
        return
    assert len(encoded["input_ids"]) == len(encoded["labels"]) <= cfg.max_seq_len
    assert any(t != IGNORE_INDEX for t in encoded["labels"])


GOOD = [{"conversations": [{"role": "user", "content": f"question {i}"},
                           {"role": "assistant", "content": f"answer {i}"}]}
        for i in range(6)]


def corrupt(line: str, how: str, at: float) -> bytes:
    if how == "truncated":
        return line[:max(1, int(len(line) * at))].encode()
    if how == "not_utf8":
        cut = max(1, int(len(line) * at))
        return line[:cut].encode() + b"\xff\xfe" + line[cut:].encode()
    record = json.loads(line)
    if how == "bad_role":
        record["conversations"][0]["role"] = "narrator"
    elif how == "empty_content":
        record["conversations"][1]["content"] = ""
    elif how == "not_a_list":
        record["conversations"] = "hello"
    return json.dumps(record).encode()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad_line=st.integers(0, len(GOOD) - 1), at=st.floats(0.05, 0.95),
       how=st.sampled_from(["truncated", "not_utf8", "bad_role", "empty_content", "not_a_list"]))
def test_prepare_names_the_corrupted_line(bad_line, at, how, capsys, monkeypatch, one_thread):
    with tempfile.TemporaryDirectory() as tmp:
        monkeypatch.setenv("MINIMIND_SCALE_CACHE", str(Path(tmp) / "cache"))
        data = Path(tmp) / "data.jsonl"
        lines = [json.dumps(r).encode() for r in GOOD]
        lines[bad_line] = corrupt(lines[bad_line].decode(), how, at)
        data.write_bytes(b"\n".join(lines) + b"\n")
        code, err = cli_in_process(["prepare", "sft", "--data_path", str(data), "--num_proc", "1",
                                    "--max_seq_len", "64"], capsys)
    assert code == 2, err
    assert f"{data}:{bad_line + 1}:" in err and "Traceback" not in err, err
