"""Batched encoding (StageSpec.encode_batch, chat.encoding's encode_chats / encode_prompts) and the Python port
of MiniMind's chat template: each equal to its one-record, jinja-rendered counterpart.

On the shared data the batched path is compared with the per-record path of every stage, and the
per-record path with the original implementation (apply_chat_template, then the offsets of one
tokenizer call); the port is compared with apply_chat_template on every shared and test data set and on
generated conversations, for both MiniMind templates (the shared tokenizer's and the packaged one).
"""
from __future__ import annotations

import functools
import json
from bisect import bisect_left, bisect_right
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minimind_scale.chat import template
from minimind_scale.chat.encoding import (
    assistant_char_spans,
    encode_chat,
    encode_chats,
    encode_prompt,
    encode_prompts,
)
from minimind_scale.chat.messages import normalize_messages
from minimind_scale.chat.template import render_chat
from minimind_scale.data.prepare import prepare_dataset
from minimind_scale.data.record_draws import RecordPosition
from minimind_scale.data.rows import IGNORE_INDEX
from minimind_scale.errors import RecordError, UserError
from minimind_scale.models.build import load_tokenizer
from minimind_scale.training.registry import discover, get_stage

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_TOKENIZER = SHARED / "tokenizers" / "minimind"
needs_shared = pytest.mark.skipif(not (SHARED / "data").is_dir() or not SHARED_TOKENIZER.is_dir(),
                                  reason="../shared (real data, MiniMind tokenizer) is absent")
TOKENIZERS = ["shared", "packaged"]


@functools.cache
def _tokenizer(name: str):
    if name == "shared":
        if not SHARED_TOKENIZER.is_dir():
            pytest.skip("shared MiniMind tokenizer absent")
        return load_tokenizer(str(SHARED_TOKENIZER))
    return load_tokenizer(None)


@pytest.fixture(scope="module", params=TOKENIZERS)
def tok(request):
    return _tokenizer(request.param)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def shared_files(prefix: str) -> list[Path]:
    return sorted((SHARED / "data").glob(f"{prefix}*.jsonl")) if (SHARED / "data").is_dir() else []


def repo_data_files() -> list[Path]:
    return sorted((REPO / "tests").rglob("*.jsonl")) + sorted((REPO / "minimind_scale" / "assets").rglob("*.jsonl"))


def _test_module_records() -> list[dict]:
    """The conversations written out in tests/test_conversation.py."""
    import test_conversation as tc

    return [tc.MULTI_TURN, tc.TOOL_CALL, tc.THINKING, tc.THINK_IN_CONTENT]


def conversations_of(records: list[dict]) -> list[tuple[list[dict], list | None]]:
    """Every valid conversation in the records: SFT ones, and both sides of preference pairs."""
    out = []
    for record in records:
        for key in (None, "chosen", "rejected"):
            if key is not None and key not in record:
                continue
            try:
                out.append(normalize_messages(record, key, require_assistant=False))
            except RecordError:
                pass
    return out


def all_conversations() -> list[tuple[list[dict], list | None]]:
    records = [r for f in shared_files("sft_") + shared_files("dpo_") + repo_data_files() for r in _jsonl(f)]
    return conversations_of(records + _test_module_records())


def jinja(messages, tools, tokenizer, **kwargs) -> str:
    if tools is not None:
        kwargs["tools"] = tools
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def original_encode_chat(messages, tools, tokenizer, max_seq_len):
    """encode_chat as it was before the port and batching: jinja, then one call's offset mapping."""
    text = jinja(messages, tools, tokenizer)
    spans = assistant_char_spans(text)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    starts, ends = [s for s, _ in offsets], [e for _, e in offsets]
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in spans:
        lo, hi = bisect_left(starts, a), bisect_right(ends, b)
        if hi > lo:
            labels[lo:hi] = ids[lo:hi]
    return {"input_ids": ids[:max_seq_len], "labels": labels[:max_seq_len]}


# ---------------------------------------------------------------- the template port


def test_the_port_serves_both_minimind_templates(tok):
    # Otherwise every test below would compare jinja with jinja.
    assert template._find_port(tok.chat_template) is template._render_minimind


def test_port_equals_apply_chat_template_on_every_data_set(tok):
    convs = all_conversations()
    assert len(convs) > 20
    for i, (messages, tools) in enumerate(convs):
        assert render_chat(messages, tools, tok) == jinja(messages, tools, tok), i
        prompt = messages[:-1] or messages
        for kwargs in ({}, {"open_thinking": True}, {"open_thinking": False}):
            assert (render_chat(prompt, tools, tok, add_generation_prompt=True, **kwargs)
                    == jinja(prompt, tools, tok, add_generation_prompt=True, **kwargs)), (i, kwargs)


text = st.lists(st.sampled_from(list("ab \n\t<>/\"'{}é中") + ["<think>", "</think>", "\n\n"]),
                max_size=8).map("".join)
json_value = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | text,
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                          max_leaves=6)
call = st.fixed_dictionaries({"name": text.filter(bool), "arguments": json_value | text}) \
    | st.fixed_dictionaries({"function": st.fixed_dictionaries({"name": text.filter(bool),
                                                                "arguments": json_value | text})})
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool"]), "content": text}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": text},
                          optional={"reasoning_content": text, "tool_calls": st.lists(call, max_size=2)}),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(message, min_size=1, max_size=6),
       tools=st.none() | st.lists(st.dictionaries(text, json_value, max_size=3), max_size=2),
       generation=st.booleans(), thinking=st.sampled_from([None, True, False, 1]))
@pytest.mark.parametrize("name", TOKENIZERS)
def test_port_equals_apply_chat_template_on_generated_conversations(name, messages, tools, generation, thinking):
    tok = _tokenizer(name)
    kwargs = {"add_generation_prompt": generation} | ({} if thinking is None else {"open_thinking": thinking})
    assert render_chat(messages, tools, tok, **kwargs) == jinja(messages, tools, tok, **kwargs)


def test_inputs_the_port_does_not_handle_go_to_jinja(tok, monkeypatch):
    calls = []
    monkeypatch.setattr(template, "_render_minimind", lambda *a, **k: calls.append(a) or "port")
    monkeypatch.setattr(template, "_PORTS", {})
    monkeypatch.setattr(template, "PORTED_TEMPLATES",
                        dict.fromkeys(template.PORTED_TEMPLATES, template._render_minimind))
    plain = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert render_chat(plain, None, tok) == "port"
    odd = [
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}],
        [{"role": "user", "content": "q", "thinking": "t"}],  # a key transformers aliases
        [{"role": "user", "content": ["block"]}],
        [],
    ]
    for messages in odd:
        try:
            out = render_chat(messages, None, tok)
        except Exception:  # jinja's own verdict (a tool call without arguments cannot render)
            out = None
        assert out != "port"
    assert render_chat(plain, None, tok, custom_flag=True) != "port"  # a template argument the port lacks
    assert len(calls) == 1


def test_an_unknown_template_renders_with_jinja():
    tok = load_tokenizer(None)
    tok.chat_template += "{{- 'END' }}"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert render_chat(messages, None, tok).endswith("<|im_end|>\nEND")


# ---------------------------------------------------------------- batched == per record == original


@needs_shared
@pytest.mark.parametrize("prefix", ["sft_", "dpo_"])
def test_encode_chats_equals_encode_chat_and_the_original_on_shared_data(prefix):
    tok = _tokenizer("shared")
    convs = conversations_of([r for f in shared_files(prefix) for r in _jsonl(f)])
    batched = [e for i in range(0, len(convs), 400) for e in encode_chats(convs[i:i + 400], tok, 10**9)]
    assert batched == [encode_chat(m, t, tok, 10**9) for m, t in convs]
    assert batched == [original_encode_chat(m, t, tok, 10**9) for m, t in convs]
    assert encode_chats(convs[:50], tok, 128) == [original_encode_chat(m, t, tok, 128) for m, t in convs[:50]]


def test_encode_prompts_equals_encode_prompt(tok):
    convs = all_conversations()
    prompts = [(messages[:-1] or messages, tools) for messages, tools in convs]
    thinking = [{"open_thinking": i % 3 == 0} for i in range(len(prompts))]
    assert encode_prompts(prompts, tok, thinking) == [encode_prompt(m, t, tok, **k) for (m, t), k in
                                                      zip(prompts, thinking)]
    prompts = prompts[::10]
    assert encode_prompts(prompts, tok) == [encode_prompt(m, t, tok) for m, t in prompts]
    assert encode_prompts(prompts[:3], tok, {"open_thinking": True}) == \
        [encode_prompt(m, t, tok, open_thinking=True) for m, t in prompts[:3]]
    assert encode_prompts([], tok) == []
    with pytest.raises(ValueError):
        encode_prompts(prompts[:2], tok, thinking[:1])


def _outcome(fn, *args):
    """What one record gives: its columns, or (field, reason) of its RecordError."""
    try:
        return fn(*args)
    except RecordError as e:
        return ("error", e.field, e.reason)


def _as_outcome(result):
    return ("error", result.field, result.reason) if isinstance(result, RecordError) else result


BAD = [{"text": ""}, {"text": 3}, {"conversations": []}, {"chosen": [{"role": "user", "content": "q"}]},
       {"margin": "x"}, {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]}]


def _stage_cfg(spec, tmp_path, **fields):
    if spec.name == "lora":
        fields["model"] = "some/model_dir"
    if spec.name == "distill":  # preparing data never loads the teacher
        (tmp_path / "teacher").mkdir(exist_ok=True)
        (tmp_path / "teacher" / "config.json").write_text("{}")
        fields["teacher"] = str(tmp_path / "teacher")
    return spec.config(**fields)


@needs_shared
@pytest.mark.parametrize("stage, prefix", [("pretrain", "pretrain_"), ("full_sft", "sft_"), ("lora", "sft_"),
                                           ("distill", "sft_"), ("dpo", "dpo_"), ("reward", "dpo_")])
def test_encode_batch_equals_encode_on_shared_data(stage, prefix, tmp_path):
    discover()
    spec = get_stage(stage)
    assert spec.encode_batch is not None
    tok = _tokenizer("shared")
    records = [r for f in shared_files(prefix) for r in _jsonl(f)]
    if stage == "pretrain":
        records = records[::5]  # 3,000 of the 15,000 texts keep this test quick
    # bad records and bad margins mixed in, and pairs that are the same or too long for 128 tokens
    records = BAD + records[:3] + [dict(records[0], margin=bool(1))] + records
    if prefix == "dpo_":
        pair = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        records += [{"chosen": pair, "rejected": pair}, {"chosen": pair, "rejected": pair[:1]}]
    cfg = _stage_cfg(spec, tmp_path, max_seq_len=128)  # short enough that some pairs have no loss token
    per_record = [_outcome(spec.encode, r, tok, cfg) for r in records]
    got = [_as_outcome(r) for r in spec.encode_batch(records, tok, cfg)]
    assert got == per_record
    assert any(isinstance(o, tuple) for o in got) and any(isinstance(o, dict) for o in got)
    if spec.record_positions:  # the per-record choices made from positions agree too
        positions = [RecordPosition(0, n) for n in range(1, len(records) + 1)]
        placed = [_outcome(functools.partial(spec.encode, position=p), r, tok, cfg) for r, p in zip(records, positions)]
        assert [_as_outcome(r) for r in spec.encode_batch(records, tok, cfg, positions=positions)] == placed
        assert placed != per_record


# ---------------------------------------------------------------- the engine


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _sft_lines() -> list[str]:
    good = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    return [json.dumps(good), "{not json", json.dumps({"conversations": [{"role": "user"}]}), "",
            json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
            '"a string"', json.dumps(good)]


@pytest.mark.parametrize("batched", [True, False])
def test_bad_records_give_the_same_report_with_and_without_encode_batch(batched, tmp_path):
    discover()
    spec = get_stage("full_sft")
    if not batched:
        spec = spec.model_copy(update={"encode_batch": None})
    data = _write(tmp_path / "d.jsonl", _sft_lines())
    cfg = spec.config(data_path=[str(data)], num_proc=1, cache_dir=str(tmp_path / "cache"), packing=False)
    with pytest.raises(UserError) as info:
        prepare_dataset(spec, cfg, load_tokenizer(None), log=lambda *_: None)
    assert str(info.value) == (
        f"3 of 6 records are malformed (set skip_bad_records true to skip them):\n"
        f"{data}:2: not valid JSON: Expecting property name enclosed in double quotes (column 2)\n"
        f"{data}:3: field 'conversations[0].content': missing\n"
        f"{data}:6: field 'record': a line must hold one JSON object")


def test_kept_rows_are_the_same_with_and_without_encode_batch(tmp_path):
    discover()
    spec = get_stage("full_sft")
    data = _write(tmp_path / "d.jsonl", _sft_lines())
    rows = []
    for s, cache in ((spec, "a"), (spec.model_copy(update={"encode_batch": None}), "b")):
        cfg = s.config(data_path=[str(data)], num_proc=1, cache_dir=str(tmp_path / cache), packing=False,
                       skip_bad_records=True)
        ds, _, report = prepare_dataset(s, cfg, load_tokenizer(None), log=lambda *_: None)
        rows.append((ds.to_dict(), report.skipped, report.records))
    assert rows[0] == rows[1] and rows[0][1:] == (3, 3)


def test_encode_batch_raising_a_record_error_falls_back_to_encode(tmp_path):
    discover()
    base = get_stage("full_sft")

    def broken(records, tokenizer, cfg, positions=None):
        raise RecordError("conversations", "encode_batch gave up")

    spec = base.model_copy(update={"encode_batch": broken})
    data = _write(tmp_path / "d.jsonl", _sft_lines())
    cfg = spec.config(data_path=[str(data)], num_proc=1, cache_dir=str(tmp_path / "cache"), packing=False,
                      skip_bad_records=True)
    ds, _, report = prepare_dataset(spec, cfg, load_tokenizer(None), log=lambda *_: None)
    assert (len(ds), report.skipped) == (3, 3)


def test_encode_batch_with_the_wrong_number_of_results_is_refused(tmp_path):
    discover()
    spec = get_stage("full_sft").model_copy(update={"encode_batch": lambda records, tok, cfg, **_: records[:-1]})
    data = _write(tmp_path / "d.jsonl", _sft_lines()[:1] * 3)
    cfg = spec.config(data_path=[str(data)], num_proc=1, cache_dir=str(tmp_path / "cache"), packing=False)
    with pytest.raises(ValueError, match="2 results for 3 records"):
        prepare_dataset(spec, cfg, load_tokenizer(None), log=lambda *_: None)


def test_line_spans_found_with_numpy_equal_the_line_by_line_ones(tmp_path):
    import pyarrow as pa

    from minimind_scale.data import prepare as data

    content = b'{"a": 1}\n\n   \n\r\n\t \x0b\x0c\nx\r\n\xe4\xb8\xad\n  y  \n\n' * 3 + b"last, without a newline"
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    expected = list(data._line_spans(str(path)))
    assert [r["line"] for r in expected][:4] == [1, 6, 7, 8]
    for block_bytes in (1, 5, 64, 1 << 20):
        out = tmp_path / f"spans-{block_bytes}.arrow"
        data._write_line_spans(str(path), str(out), block_bytes=block_bytes)
        with pa.OSFile(str(out)) as f:
            assert pa.ipc.open_stream(f).read_all().to_pylist() == expected, block_bytes


PROMPT_RECORDS = [{"prompt": "What is 2 + 2?", "answer": "4"}, {"prompt": [{"role": "user", "content": "q"}]},
                  {"prompt": ""}, {"prompt": 3}, {"answer": "no prompt"},
                  {"conversations": [{"role": "assistant", "content": "no user turn"}]},
                  {"conversations": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                     {"role": "assistant", "content": ""}], "gt": ["x"]},
                  {"conversations": [{"role": "user", "content": "q"}], "gt": {"bad": 1}}]


@needs_shared
@pytest.mark.parametrize("stage", ["grpo", "ppo", "agent"])
def test_prompt_encode_batch_equals_encode_on_shared_data(stage, tmp_path):
    """The online stages' encode_batch (prompts.encode_batch, and agent's through it) against their `encode`,
    record by record: rlaif-style conversations (the shared SFT data, its trailing assistant turn dropped, some
    with tools), the agent tasks, and bad records, with both open_thinking choices and truncated prompts."""
    discover()
    spec = get_stage(stage)
    assert spec.encode_batch is not None
    tok = _tokenizer("shared")
    records = PROMPT_RECORDS + _jsonl(REPO / "tests" / "data" / "agent" / "tasks.jsonl")
    records += [r for f in shared_files("sft_") for r in _jsonl(f)][::3]
    tools = str(REPO / "examples" / "agent_tools.py")
    fields = {"tools": tools} if stage == "agent" else {"reward_funcs": ["accuracy"]}
    cfg = spec.config(max_prompt_len=64, thinking_ratio=0.5, **fields)
    per_record = [_outcome(spec.encode, r, tok, cfg) for r in records]
    got = [_as_outcome(r) for r in spec.encode_batch(records, tok, cfg)]
    assert got == per_record
    assert sum(isinstance(o, tuple) for o in got) >= 4 and sum(isinstance(o, dict) for o in got) > 500
    assert {len(o["prompt_ids"]) == 64 for o in got if isinstance(o, dict)} == {True, False}
