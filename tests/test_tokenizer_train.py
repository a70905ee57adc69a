"""Tokenizer training: MiniMind-compatible token table, round trips, chat-template equality, errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from transformers import AutoTokenizer

from minimind_scale.chat.template import CHAT_TEMPLATE
from minimind_scale.errors import UserError
from minimind_scale.models.tokenizer_train import (
    ADDED_TOKENS,
    RESERVED_TOKENS,
    SPECIAL_TOKENS,
    TrainTokenizerConfig,
    run,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared"
MINIMIND_TOKENIZER = SHARED / "tokenizers" / "minimind"
SHIPPED = REPO / "minimind_scale" / "assets" / "tokenizer"
needs_shared = pytest.mark.skipif(not MINIMIND_TOKENIZER.is_dir(), reason="../shared is not present")

CORPUS = [
    {"text": "The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。"},
    {"text": "Numbers 0123456789 and symbols !@#$%^&*() and emoji 🙂🚀."},
    {"conversations": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris.", "reasoning_content": "France's capital is Paris."},
    ]},
    {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"}]},
]


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    data = _write_jsonl(root / "corpus.jsonl", [json.dumps(r, ensure_ascii=False) for r in CORPUS * 5])
    run(TrainTokenizerConfig(data_path=[str(data)], vocab_size=400, out_dir=str(root / "out")))
    return AutoTokenizer.from_pretrained(str(root / "out"))


@pytest.fixture(scope="module")
def minimind_template() -> str:
    if not MINIMIND_TOKENIZER.is_dir():
        pytest.skip("../shared is not present")
    return json.loads((MINIMIND_TOKENIZER / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]


def _token_table(tok) -> list[tuple[str, bool]]:
    return [(tok.added_tokens_decoder[i].content, tok.added_tokens_decoder[i].special) for i in range(36)]


def _check_layout(tok):
    expected = [(t, t in SPECIAL_TOKENS) for t in RESERVED_TOKENS]
    assert _token_table(tok) == expected
    if MINIMIND_TOKENIZER.is_dir():
        assert _token_table(tok) == _token_table(AutoTokenizer.from_pretrained(str(MINIMIND_TOKENIZER)))
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert set(tok.all_special_tokens) == set(SPECIAL_TOKENS)
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=True)  # no bos / eos added
    assert tok.chat_template == CHAT_TEMPLATE


def _check_round_trip(tok):
    for text in ["Hello, world!", "  leading spaces and\ttabs\nnewlines", "中文：法国的首都是巴黎。",
                 "emoji 🙂🚀👍🏽 and ñ, ü, ß", "<think>\nhmm\n</think>\n\n<tool_call>{}</tool_call>"]:
        assert tok.decode(tok.encode(text)) == text
    # Reserved ids encode as single tokens; only 0..20 vanish with skip_special_tokens.
    assert tok.encode("<|im_start|><think></think><|im_end|>") == [1, 25, 26, 2]
    assert tok.decode([1, 25, 26, 2], skip_special_tokens=True) == "<think></think>"


def test_trained_tokenizer_layout_and_round_trip(trained):
    _check_layout(trained)
    _check_round_trip(trained)
    assert len(trained) <= 400


def test_shipped_tokenizer(tmp_path):
    tok = AutoTokenizer.from_pretrained(str(SHIPPED))
    _check_layout(tok)
    _check_round_trip(tok)
    assert "chat_template" in json.loads((SHIPPED / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 500_000


def test_shipped_tokenizer_is_reproducible(tmp_path):
    """Retraining on the committed demo data with the documented command gives the same files."""
    demo = REPO / "minimind_scale" / "assets" / "demo"
    out = tmp_path / "tok"
    run(TrainTokenizerConfig(data_path=[str(demo / "pretrain.jsonl"), str(demo / "sft.jsonl")],
                             vocab_size=1024, out_dir=str(out)))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (SHIPPED / name).read_bytes(), name


# --- chat template equality --------------------------------------------------------------------

WEATHER_TOOL = {"name": "get_weather", "description": "查询天气 🌦", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
SUM_TOOL = {"type": "function", "function": {"name": "add", "description": "add two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}

CASES: list[tuple[list[dict], list | None]] = [
    ([{"role": "user", "content": "hi"}], None),
    ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"},
      {"role": "assistant", "content": "hello again"}], None),
    ([{"role": "system", "content": ""}, {"role": "user", "content": "empty system"}], None),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "mid-conversation system"},
      {"role": "assistant", "content": "b"}], None),
    ([{"role": "user", "content": None}, {"role": "assistant", "content": None}], None),
    ([{"role": "user", "content": "x"}, {"role": "developer", "content": "unknown roles are dropped"},
      {"role": "assistant", "content": "y"}], None),
    # reasoning
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "think hard"}],
     None),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\na", "reasoning_content": "\n\nr\n\n"}],
     None),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": ""}], None),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nplan\n</think>\n\nanswer"}], None),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "no opening tag</think>answer"}], None),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>a</think>b</think>c"}], None),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "content": "<think>kept</think>x", "reasoning_content": "given"}], None),
    # tools in the system turn
    ([{"role": "system", "content": "You are a tool user."}, {"role": "user", "content": "weather in 北京?"}],
     [WEATHER_TOOL]),
    ([{"role": "user", "content": "no system turn"}], [WEATHER_TOOL, SUM_TOOL]),
    ([{"role": "system", "content": ""}, {"role": "user", "content": "empty system"}], [SUM_TOOL]),
    ([{"role": "user", "content": "no tools"}], []),
    # tool calls and responses
    ([{"role": "user", "content": "weather?"},
      {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "北京"}}]},
      {"role": "tool", "content": "{\"temp\": 20}"},
      {"role": "assistant", "content": "It is 20 degrees."}], [WEATHER_TOOL]),
    ([{"role": "user", "content": "two calls"},
      {"role": "assistant", "content": "Let me check.", "tool_calls": [
          {"type": "function", "function": {"name": "add", "arguments": "{\"a\": 1, \"b\": 2}"}},
          {"name": "get_weather", "arguments": {"city": "Paris"}}]},
      {"role": "tool", "content": "3"}, {"role": "tool", "content": "sunny"},
      {"role": "user", "content": "<tool_response>\nlooks like a response\n</tool_response>"},
      {"role": "assistant", "content": "\n", "tool_calls": [{"name": "add", "arguments": {}}]},
      {"role": "tool", "content": "0"}], [WEATHER_TOOL, SUM_TOOL]),
    ([{"role": "tool", "content": "a tool turn first"}, {"role": "user", "content": "then a user"},
      {"role": "assistant", "content": "<think>r</think>ok", "tool_calls": [{"name": "n", "arguments": "[1, 2]"}]}],
     None),
]


def _render(tok, messages, tools, template=None, **kwargs) -> str:
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, chat_template=template, **kwargs)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_template_matches_minimind_on_handmade_cases(trained, minimind_template, case):
    messages, tools = CASES[case]
    variants = [{}, {"add_generation_prompt": True}, {"add_generation_prompt": True, "open_thinking": True},
                {"add_generation_prompt": True, "open_thinking": False}]
    for kwargs in variants:
        ours = _render(trained, messages, tools, **kwargs)
        theirs = _render(trained, messages, tools, minimind_template, **kwargs)
        assert ours == theirs, (case, kwargs)


def test_template_golden_output(trained):
    """Known renderings, so a fresh clone without ../shared still checks the template."""
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A", "tool_calls": [{"name": "f", "arguments": {"x": 1}}]},
                {"role": "tool", "content": "R1"}, {"role": "tool", "content": "R2"}]
    assert _render(trained, messages, None, add_generation_prompt=True) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nA\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}"
        "\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nR1\n</tool_response>\n<tool_response>\nR2\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert _render(trained, [{"role": "user", "content": "Q"}], [{"name": "f"}],
                   add_generation_prompt=True, open_thinking=True) == (
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{\"name\": \"f\"}"
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n")


def _prepare(turns: list[dict]) -> tuple[list[dict], list | None]:
    """Records keep `tools` (on the system turn) and `tool_calls` as JSON strings; templates want objects."""
    tools = None
    messages = []
    for turn in turns:
        turn = dict(turn)
        if "tools" in turn:
            tools = json.loads(turn.pop("tools"))
        if isinstance(turn.get("tool_calls"), str):
            turn["tool_calls"] = json.loads(turn["tool_calls"])
        messages.append(turn)
    return messages, tools


@needs_shared
def test_template_matches_minimind_on_shared_data(trained, minimind_template):
    files = sorted((SHARED / "data").glob("sft_*.jsonl")) + sorted((SHARED / "data").glob("dpo_*_demo.jsonl"))
    assert files
    checked = 0
    for path in files:
        with open(path, encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                record = json.loads(line)
                for key in ("conversations", "chosen", "rejected"):
                    if key not in record:
                        continue
                    messages, tools = _prepare(record[key])
                    # Alternate the generation prompt so both endings are covered without doubling the time.
                    kwargs = {"add_generation_prompt": lineno % 2 == 0}
                    ours = _render(trained, messages, tools, **kwargs)
                    theirs = _render(trained, messages, tools, minimind_template, **kwargs)
                    assert ours == theirs, f"{path.name}:{lineno} ({key})"
                    checked += 1
    assert checked > 3000


# --- errors --------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(UserError, match="nope.jsonl"):
        run(TrainTokenizerConfig(data_path=[str(missing)], out_dir=str(tmp_path / "out")))


def test_malformed_line_names_file_and_line(tmp_path):
    data = _write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"text": "fine"}), "", "{not json"])
    with pytest.raises(UserError, match=r"bad\.jsonl.*line 3"):
        run(TrainTokenizerConfig(data_path=[str(data)], out_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_non_object_line(tmp_path):
    data = _write_jsonl(tmp_path / "list.jsonl", [json.dumps({"text": "fine"}), "[1, 2]"])
    with pytest.raises(UserError, match=r"list\.jsonl.*line 2"):
        run(TrainTokenizerConfig(data_path=[str(data)], out_dir=str(tmp_path / "out")))


def test_no_text(tmp_path):
    data = _write_jsonl(tmp_path / "empty.jsonl", [json.dumps({"other": 1}), json.dumps({"text": ""})])
    with pytest.raises(UserError, match="no text"):
        run(TrainTokenizerConfig(data_path=[str(data)], out_dir=str(tmp_path / "out")))


def test_config_validation():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        TrainTokenizerConfig(data_path=[], out_dir="x")
    with pytest.raises(ValidationError):
        TrainTokenizerConfig(data_path=["a"], out_dir="x", vocab_size=10)
    with pytest.raises(ValidationError):
        TrainTokenizerConfig(data_path=["a"], out_dir="x", vocab_sise=100)
    assert TrainTokenizerConfig(data_path=["a"], out_dir="x").vocab_size == 6400
    assert ADDED_TOKENS[0] == "<tool_call>" and len(RESERVED_TOKENS) == 36
