"""The chat markup is defined once, in minimind_scale/chat/markup.py, and is what the chat template writes.

Every string constant in the package's code (docstrings aside) is scanned for a markup literal: a turn marker,
a think tag, a tool-call or tool-response tag. Only chat/markup.py, which defines them, may hold one; even the
chat template (chat/template.py) is assembled from its constants. A literal anywhere else is a second
definition that can drift from the first, as `<think>` once did (with and without its newline in different
modules).
"""
from __future__ import annotations

import ast
import json
import textwrap
from pathlib import Path

import pytest

from minimind_scale.chat import markup
from minimind_scale.chat.markup import (
    ASSISTANT_HEADER,
    EMPTY_THINK,
    THINK_CLOSE,
    THINK_OPEN,
    THINK_PROMPT_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_RESPONSE_CLOSE,
    TOOL_RESPONSE_OPEN,
    TURN_END,
    TURN_START,
)
from minimind_scale.chat.template import CHAT_TEMPLATE
from minimind_scale.models.build import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("minimind_scale", "stages")
ALLOWED = {"minimind_scale/chat/markup.py"}
LITERALS = sorted({value for name, value in vars(markup).items() if name.isupper() and isinstance(value, str)},
                  key=len)
TAGS = (TURN_START, TURN_END, THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE, TOOL_RESPONSE_OPEN,
        TOOL_RESPONSE_CLOSE)
SHARED_TOKENIZER = REPO.parent / "shared" / "tokenizers" / "minimind"
TOKENIZERS = [None] + ([str(SHARED_TOKENIZER)] if SHARED_TOKENIZER.is_dir() else [])


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring nodes of a module, its classes and its functions."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def markup_in_code(source: str, where: str) -> list[str]:
    """`where:line: literal in 'constant'` for each string constant of `source` (f-string parts included,
    docstrings not) that holds a markup literal."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found = [literal for literal in LITERALS if literal in node.value]
            if found:
                shown = node.value if len(node.value) <= 60 else node.value[:57] + "..."
                hits.append((node.lineno, f"{where}:{node.lineno}: {found[0]!r} in {shown!r}"))
    return [hit for _, hit in sorted(hits)]


def scanned_files() -> list[Path]:
    return sorted(p for root in SCANNED for p in (REPO / root).rglob("*.py"))


def test_the_tags_are_minimind_s():
    assert TAGS == ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
                    "<tool_response>", "</tool_response>")
    assert set(TAGS) <= set(LITERALS)


def test_the_scan_finds_literals_in_code_and_not_in_docstrings():
    source = textwrap.dedent('''
        """A module about <think> blocks."""
        from pydantic import Field

        def f(x):
            """Reads <tool_call> blocks."""
            return x.split("</think>")

        class C:
            """Writes <|im_end|>."""
            n: int = Field(1, description="weight of <think> tokens")
            m = f"closing {x} <|im_end|>"
        ''')
    assert [hit.split(":")[1] for hit in markup_in_code(source, "sample.py")] == ["7", "11", "12"]


def test_no_markup_literal_outside_the_markup_module():
    files = scanned_files()
    assert len(files) > 50, "the scan found too few files to mean anything"
    hits = []
    for path in files:
        where = path.relative_to(REPO).as_posix()
        if where not in ALLOWED:
            hits += markup_in_code(path.read_text(encoding="utf-8"), where)
    assert not hits, ("chat markup written out instead of imported from minimind_scale/chat/markup.py:\n"
                      + "\n".join(hits))


def test_the_template_built_from_the_markup_is_the_shipped_one():
    shipped = REPO / "minimind_scale" / "assets" / "tokenizer" / "tokenizer_config.json"
    assert CHAT_TEMPLATE == json.loads(shipped.read_text(encoding="utf-8"))["chat_template"]


@pytest.mark.parametrize("path", TOKENIZERS, ids=lambda p: "packaged" if p is None else "shared")
def test_the_markup_is_what_the_templates_write(path):
    tok = load_tokenizer(path)
    for tag in TAGS:
        assert len(tok(tag, add_special_tokens=False).input_ids) == 1, f"{tag!r} is not one token"
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text.endswith(ASSISTANT_HEADER + EMPTY_THINK + "a" + TURN_END + "\n")
    prompt = chat[:1]
    assert tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True).endswith(
        ASSISTANT_HEADER + EMPTY_THINK)
    assert tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, open_thinking=True).endswith(
        ASSISTANT_HEADER + THINK_PROMPT_OPEN)
