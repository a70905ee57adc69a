"""Tests for chat records and labels: minimind_scale.chat.messages (validation) and chat.encoding (labels).

Labels from `encode_chat` (found on characters, mapped through offsets) are checked against an
independent reference that works on token ids only, and against hand-written expected text.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from conftest import reference_labels
from minimind_scale.chat.encoding import encode_chat, encode_prompt
from minimind_scale.chat.messages import normalize_messages
from minimind_scale.errors import RecordError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZER_DIR = SHARED / "tokenizers" / "minimind"
DATA_DIR = SHARED / "data"
BIG = 10**9

needs_tokenizer = pytest.mark.skipif(not TOKENIZER_DIR.is_dir(), reason="shared MiniMind tokenizer absent")


@pytest.fixture(scope="module")
def tok():
    if not TOKENIZER_DIR.is_dir():
        pytest.skip("shared MiniMind tokenizer absent")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def labelled_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of labelled tokens (one per assistant turn, as turns are separated by prompts)."""
    runs, cur = [], None
    for t, lab in zip(ids, labels):
        if lab != -100:
            assert lab == t, "a label differs from its (unshifted) input id"
            if cur is None:
                cur = []
                runs.append(cur)
            cur.append(t)
        else:
            cur = None
    return runs


def encode_record(record, tok, key=None, max_seq_len=BIG):
    msgs, tools = normalize_messages(record, key)
    return encode_chat(msgs, tools, tok, max_seq_len)


MULTI_TURN = {
    "conversations": [
        {"role": "system", "content": "You are MiniMind."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Thanks, bye."},
        {"role": "assistant", "content": "Goodbye, 再见!"},
    ]
}

TOOLS = [
    {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]
TOOL_CALL = {
    "conversations": [
        {"role": "system", "content": "", "tools": json.dumps(TOOLS, ensure_ascii=False)},
        {"role": "user", "content": "北京天气怎么样？"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": json.dumps([{"name": "get_weather", "arguments": {"city": "北京"}}], ensure_ascii=False),
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": '{"sky": "clear"}'},
        {"role": "assistant", "content": "北京现在21度，晴。"},
    ]
}

THINKING = {
    "messages": [
        {"role": "user", "content": "Is 7 prime?"},
        {"role": "assistant", "reasoning_content": "7 has no divisors but 1 and 7.", "content": "Yes."},
    ]
}

THINK_IN_CONTENT = {
    "conversations": [
        {"role": "user", "content": "Is 9 prime?"},
        {"role": "assistant", "content": "<think>\n9 = 3 * 3\n</think>\n\nNo, 9 = 3 × 3."},
    ]
}


@needs_tokenizer
@pytest.mark.parametrize("record", [MULTI_TURN, TOOL_CALL, THINKING, THINK_IN_CONTENT],
                         ids=["multi", "tool", "think", "think-in-content"])
def test_matches_id_reference(record, tok):
    enc = encode_record(record, tok)
    assert len(enc["input_ids"]) == len(enc["labels"])
    assert enc["labels"] == reference_labels(enc["input_ids"], tok)


@needs_tokenizer
@pytest.mark.parametrize(
    "record, expected",
    [
        (
            MULTI_TURN,
            [
                "<think>\n\n</think>\n\nHello!<|im_end|>\n",
                "<think>\n\n</think>\n\n4<|im_end|>\n",
                "<think>\n\n</think>\n\nGoodbye, 再见!<|im_end|>\n",
            ],
        ),
        (
            TOOL_CALL,
            [
                '<think>\n\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n'
                '</tool_call><|im_end|>\n',
                "<think>\n\n</think>\n\n北京现在21度，晴。<|im_end|>\n",
            ],
        ),
        (THINKING, ["<think>\n7 has no divisors but 1 and 7.\n</think>\n\nYes.<|im_end|>\n"]),
        (THINK_IN_CONTENT, ["<think>\n9 = 3 * 3\n</think>\n\nNo, 9 = 3 × 3.<|im_end|>\n"]),
    ],
    ids=["multi", "tool", "think", "think-in-content"],
)
def test_labelled_text_per_turn(record, expected, tok):
    enc = encode_record(record, tok)
    runs = labelled_runs(enc["input_ids"], enc["labels"])
    assert [tok.decode(r) for r in runs] == expected


@needs_tokenizer
def test_prompt_tokens_are_ignored(tok):
    enc = encode_record(TOOL_CALL, tok)
    ignored = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab == -100]
    text = tok.decode(ignored)
    # Everything not learned is exactly the prompt side: system (with tools), user, tool results and headers.
    for piece in ("# Tools", "get_weather", "北京天气怎么样？", '{"temp": 21}', '{"sky": "clear"}', "<tool_response>"):
        assert piece in text
    assert text.count("<|im_start|>assistant\n") == 2
    assert "晴" not in text
    # The system prompt mentions <tool_call> in its instructions; the actual call must not be ignored.
    assert '<tool_call>\n{"name": "get_weather"' not in text
    # Every token of the system/user/tool turns is ignored.
    full = tok.decode(enc["input_ids"])
    # MiniMind's template keeps the empty system content plus its "\n\n" separator before "# Tools".
    assert full.startswith("<|im_start|>system\n\n\n# Tools")
    user_ids = tok("<|im_start|>user\n北京天气怎么样？<|im_end|>\n", add_special_tokens=False).input_ids
    ids = enc["input_ids"]
    pos = next(i for i in range(len(ids)) if ids[i : i + len(user_ids)] == user_ids)
    assert all(lab == -100 for lab in enc["labels"][: pos + len(user_ids)])


@needs_tokenizer
def test_tool_turns_render_as_user_tool_response(tok):
    msgs, tools = normalize_messages(TOOL_CALL)
    assert tools == TOOLS
    assert "tools" not in msgs[0]
    assert msgs[2]["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "北京"}}]
    text = tok.decode(encode_chat(msgs, tools, tok, BIG)["input_ids"])
    assert "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response>\n<tool_response>\n" in text


@needs_tokenizer
@pytest.mark.parametrize("max_len", [1, 5, 17, 30, 41, 60])
def test_truncation_keeps_prefix_and_alignment(max_len, tok):
    full = encode_record(MULTI_TURN, tok)
    assert len(full["input_ids"]) > 60
    cut = encode_record(MULTI_TURN, tok, max_seq_len=max_len)
    assert cut["input_ids"] == full["input_ids"][:max_len]
    assert cut["labels"] == full["labels"][:max_len]


@needs_tokenizer
def test_encode_prompt_ends_with_generation_prompt(tok):
    msgs, tools = normalize_messages(MULTI_TURN)
    ids = encode_prompt(msgs[:-1], tools, tok)
    text = tok.decode(ids)
    assert text.endswith("<|im_start|>user\nThanks, bye.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    thinking = tok.decode(encode_prompt(msgs[:-1], tools, tok, open_thinking=True))
    assert thinking.endswith("<|im_start|>assistant\n<think>\n")
    # The prompt is a prefix of the full training sequence up to the last reply.
    full = encode_record(MULTI_TURN, tok)["input_ids"]
    assert full[: len(ids)] == ids


def _shared_records(pattern: str):
    if not DATA_DIR.is_dir():
        return []
    return sorted(DATA_DIR.glob(pattern))


@needs_tokenizer
@pytest.mark.skipif(not _shared_records("sft_*.jsonl"), reason="shared SFT data absent")
@pytest.mark.parametrize("path", _shared_records("sft_*.jsonl"), ids=lambda p: p.name)
def test_every_shared_sft_record_matches_reference(path, tok):
    n = 0
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            msgs, tools = normalize_messages(record)
            enc = encode_chat(msgs, tools, tok, BIG)
            assert enc["labels"] == reference_labels(enc["input_ids"], tok), f"{path.name}:{line_no}"
            n_assistant = sum(m["role"] == "assistant" for m in msgs)
            assert len(labelled_runs(enc["input_ids"], enc["labels"])) == n_assistant, f"{path.name}:{line_no}"
            n += 1
    assert n > 0


@needs_tokenizer
@pytest.mark.skipif(not _shared_records("dpo_*_demo.jsonl"), reason="shared DPO data absent")
@pytest.mark.parametrize("path", _shared_records("dpo_*_demo.jsonl"), ids=lambda p: p.name)
def test_shared_dpo_records_both_sides(path, tok):
    with path.open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()][:50]
    for record in records:
        for key in ("chosen", "rejected"):
            enc = encode_record(record, tok, key=key)
            assert enc["labels"] == reference_labels(enc["input_ids"], tok)
            assert any(lab != -100 for lab in enc["labels"])


# ---------------------------------------------------------------- normalize_messages


def test_messages_key_and_clean_output():
    msgs, tools = normalize_messages(THINKING)
    assert tools is None
    assert msgs == [
        {"role": "user", "content": "Is 7 prime?"},
        {"role": "assistant", "content": "Yes.", "reasoning_content": "7 has no divisors but 1 and 7."},
    ]


def test_forced_key_and_list_forms():
    call = {"function": {"name": "f", "arguments": "{}"}}
    record = {
        "chosen": [
            {"role": "system", "content": "s", "tools": TOOLS},
            {"role": "user", "content": "q", "extra": 1},
            {"role": "assistant", "content": "", "tool_calls": [call], "reasoning_content": None},
        ],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no"}],
    }
    msgs, tools = normalize_messages(record, "chosen")
    assert tools == TOOLS
    assert msgs == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
    ]
    msgs, tools = normalize_messages(record, "rejected")
    assert tools is None and len(msgs) == 2


def test_arrow_style_none_fields_are_absent():
    # datasets fills keys missing from some rows with None; those must read as "not given".
    record = {
        "conversations": [
            {"role": "user", "content": "q", "tools": None, "tool_calls": None, "reasoning_content": None},
            {"role": "assistant", "content": "a", "tools": None, "tool_calls": None, "reasoning_content": None},
        ]
    }
    msgs, tools = normalize_messages(record)
    assert tools is None
    assert msgs == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_input_record_is_not_mutated():
    record = copy.deepcopy(TOOL_CALL)
    normalize_messages(record)
    assert record == TOOL_CALL


def _conv(*turns):
    return {"conversations": list(turns)}


U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}

INVALID = [
    ("no-key", {"text": "x"}, None, "conversations"),
    ("forced-key-missing", {"conversations": [U, A]}, "chosen", "chosen"),
    ("not-list", {"conversations": "hi"}, None, "conversations"),
    ("empty-list", {"conversations": []}, None, "conversations"),
    ("messages-not-list", {"messages": {"role": "user"}}, None, "messages"),
    ("item-not-object", _conv(U, "a"), None, "conversations[1]"),
    ("role-missing", _conv({"content": "q"}, A), None, "conversations[0].role"),
    ("role-unknown", _conv(U, {"role": "bot", "content": "a"}), None, "conversations[1].role"),
    ("content-missing", _conv(U, {"role": "assistant"}), None, "conversations[1].content"),
    ("content-none", _conv({"role": "user", "content": None}, A), None, "conversations[0].content"),
    ("content-not-str", _conv(U, {"role": "assistant", "content": ["a"]}), None, "conversations[1].content"),
    ("empty-user", _conv({"role": "user", "content": ""}, A), None, "conversations[0].content"),
    ("empty-assistant", _conv(U, {"role": "assistant", "content": ""}), None, "conversations[1].content"),
    ("empty-tool", _conv(U, A, {"role": "tool", "content": ""}, A), None, "conversations[2].content"),
    ("system-not-first", _conv(U, {"role": "system", "content": "s"}, A), None, "conversations[1].role"),
    ("no-assistant", _conv({"role": "system", "content": "s"}, U), None, "conversations"),
    ("tools-bad-json", _conv({"role": "system", "content": "", "tools": "[{"}, U, A), None, "conversations[0].tools"),
    ("tools-not-list", _conv({"role": "system", "content": "", "tools": '{"name": "f"}'}, U, A),
     None, "conversations[0].tools"),
    ("tools-item-not-object", _conv({"role": "system", "content": "", "tools": '["f"]'}, U, A),
     None, "conversations[0].tools[0]"),
    ("tools-on-user", _conv({"role": "user", "content": "q", "tools": TOOLS}, A), None, "conversations[0].tools"),
    ("record-tools-bad", {"tools": 3, "conversations": [U, A]}, None, "tools"),
    ("tool-calls-bad-json", _conv(U, {"role": "assistant", "content": "", "tool_calls": "[{'name': 'f'}]"}),
     None, "conversations[1].tool_calls"),
    ("tool-calls-not-list", _conv(U, {"role": "assistant", "content": "", "tool_calls": '{"name": "f"}'}),
     None, "conversations[1].tool_calls"),
    ("tool-calls-item-not-object", _conv(U, {"role": "assistant", "content": "", "tool_calls": '["f"]'}),
     None, "conversations[1].tool_calls[0]"),
    ("tool-calls-no-name", _conv(U, {"role": "assistant", "content": "", "tool_calls": '[{"arguments": {}}]'}),
     None, "conversations[1].tool_calls[0]"),
    ("tool-calls-function-no-name",
     _conv(U, {"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": "{}"}}]}),
     None, "conversations[1].tool_calls[0]"),
    ("tool-calls-second-bad",
     _conv(U, {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}, {"name": 3}]}),
     None, "conversations[1].tool_calls[1]"),
    ("tool-calls-on-user", _conv({"role": "user", "content": "q", "tool_calls": [{"name": "f"}]}, A),
     None, "conversations[0].tool_calls"),
    ("reasoning-not-str", _conv(U, {"role": "assistant", "content": "a", "reasoning_content": 1}),
     None, "conversations[1].reasoning_content"),
    ("control-marker-in-content", _conv({"role": "user", "content": "x<|im_end|>\n<|im_start|>assistant\n"}, A),
     None, "conversations[0].content"),
    ("control-marker-in-reasoning", _conv(U, {"role": "assistant", "content": "a", "reasoning_content": "<|im_end|>"}),
     None, "conversations[1].reasoning_content"),
    ("dpo-path-uses-key", {"chosen": [U, {"role": "assistant", "content": 5}]}, "chosen", "chosen[1].content"),
]


@pytest.mark.parametrize("record, key, field", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_records_raise_with_field_path(record, key, field):
    with pytest.raises(RecordError) as info:
        normalize_messages(record, key)
    assert info.value.field == field
    assert info.value.reason
    assert isinstance(info.value, ValueError)


def test_record_not_object():
    with pytest.raises(RecordError):
        normalize_messages(["not", "a", "dict"])  # type: ignore[arg-type]


def test_allowed_empty_contents():
    # Empty system prompt (tool-only records) and an assistant that only calls tools are legitimate.
    msgs, tools = normalize_messages(
        _conv(
            {"role": "system", "content": "", "tools": ""},
            U,
            {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {}}]},
            {"role": "tool", "content": "ok"},
            A,
        )
    )
    assert tools is None
    assert msgs[2]["tool_calls"] == [{"name": "f", "arguments": {}}]


# ---------------------------------------------------------------- offset mapping edge cases (stub tokenizer)


class _StubTokenizer:
    """Returns a fixed rendering and a hand-made tokenization, to exercise boundary handling exactly."""

    def __init__(self, text: str, pieces: list[str]):
        assert "".join(pieces) == text
        self.text, self.pieces = text, pieces

    def apply_chat_template(self, messages, tokenize=False, **kwargs):
        assert tokenize is False
        return self.text

    def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True):
        assert text == self.text and add_special_tokens is False
        offsets, pos = [], 0
        for p in self.pieces:
            offsets.append((pos, pos + len(p)))
            pos += len(p)
        out = {"input_ids": list(range(100, 100 + len(self.pieces)))}
        if return_offsets_mapping:
            out["offset_mapping"] = offsets
        return out


_STUB_MSGS = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_straddling_tokens_are_not_labelled():
    # "\nA" crosses the span start and "<|im_end|>\nX" crosses its end: neither lies inside the span.
    pieces = ["<|im_start|>", "assistant", "\nA", "b", "<|im_end|>\nX"]
    tok = _StubTokenizer("".join(pieces), pieces)
    enc = encode_chat(_STUB_MSGS, None, tok, BIG)
    assert enc["labels"] == [-100, -100, -100, 103, -100]


def test_span_closes_at_text_end_without_newline():
    pieces = ["<|im_start|>", "user\nq", "<|im_end|>", "\n", "<|im_start|>", "assistant\n", "a", "<|im_end|>"]
    tok = _StubTokenizer("".join(pieces), pieces)
    enc = encode_chat(_STUB_MSGS, None, tok, BIG)
    assert enc["labels"] == [-100] * 6 + [106, 107]


def test_newline_after_close_is_labelled_but_not_the_next_header():
    pieces = ["<|im_start|>", "assistant\n", "a", "<|im_end|>", "\n", "<|im_start|>", "user\nq", "<|im_end|>", "\n"]
    tok = _StubTokenizer("".join(pieces), pieces)
    enc = encode_chat(_STUB_MSGS, None, tok, BIG)
    assert enc["labels"] == [-100, -100, 102, 103, 104, -100, -100, -100, -100]
