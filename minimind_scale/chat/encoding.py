"""Validated conversations -> token ids, with labels on the assistant replies only.

`encode_chat` renders one conversation (`template.render_chat`), tokenises it once and labels every token
that lies wholly inside an assistant reply; `encode_prompt` gives the token ids of a prompt followed by the
generation prompt. `encode_chats` and `encode_prompts` do the same for a list of conversations, equal item
by item, with one tokenizer call for the whole list (what data preparation uses).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence

from minimind_scale.chat.markup import ASSISTANT_HEADER, TURN_END
from minimind_scale.chat.template import render_chat
from minimind_scale.data.rows import IGNORE_INDEX


def assistant_char_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of every assistant reply in a rendered ChatML string.

    Each span starts right after the assistant header (`<|im_start|>assistant\\n`) and ends after the
    closing `<|im_end|>` plus its newline (or right after `<|im_end|>` when the text stops there).
    """
    spans = []
    pos = text.find(ASSISTANT_HEADER)
    while pos != -1:
        start = pos + len(ASSISTANT_HEADER)
        close = text.find(TURN_END, start)
        if close == -1:
            raise ValueError(f"chat template left an assistant turn without a closing {TURN_END}")
        end = close + len(TURN_END)
        if text.startswith("\n", end):
            end += 1
        spans.append((start, end))
        pos = text.find(ASSISTANT_HEADER, end)
    return spans


def _checked_spans(text: str, messages: list[dict]) -> list[tuple[int, int]]:
    spans = assistant_char_spans(text)
    n_assistant = sum(1 for m in messages if m["role"] == "assistant")
    if len(spans) != n_assistant:
        raise ValueError(
            f"rendered text has {len(spans)} assistant headers for {n_assistant} assistant turns; "
            "the chat template is not ChatML-shaped"
        )
    return spans


def encode_chat(messages: list[dict], tools: list | None, tokenizer, max_seq_len: int,
                text: str | None = None) -> dict:
    """Render and tokenize one conversation; labels copy input_ids on assistant replies, -100 elsewhere.

    Labels are aligned with input_ids (not shifted). Both are truncated to `max_seq_len`, keeping the
    prefix. `text`: the conversation already rendered (and perhaps rewritten); labels follow its replies.
    """
    if text is None:
        text = render_chat(messages, tools, tokenizer)
    spans = _checked_spans(text, messages)

    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    input_ids = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    # Starts and ends are each non-decreasing (byte-level pieces of one character share offsets),
    # so a span's tokens are found by bisection instead of a per-token Python loop.
    starts = [s for s, _ in offsets]
    ends = [e for _, e in offsets]
    labels = [IGNORE_INDEX] * len(input_ids)
    for a, b in spans:
        # A token is labelled iff all of its characters lie inside [a, b): one straddling either
        # boundary is left out rather than half-learned.
        lo = bisect_left(starts, a)
        hi = bisect_right(ends, b)
        if hi > lo:
            labels[lo:hi] = input_ids[lo:hi]

    return {"input_ids": input_ids[:max_seq_len], "labels": labels[:max_seq_len]}


def encode_chats(conversations: Sequence[tuple[list[dict], list | None]], tokenizer, max_seq_len: int,
                 texts: Sequence[str] | None = None) -> list[dict]:
    """`encode_chat` of each (messages, tools), equal item by item: each is rendered once, and all are
    tokenised in one call. A token's label is decided from its character offsets as in `encode_chat`, found
    by bisection over the tokenizer's own encodings, so no per-token offset list is built in Python.
    `texts`: the conversations already rendered (and perhaps rewritten), one per conversation."""
    if not conversations:
        return []
    if texts is None:
        texts = [render_chat(messages, tools, tokenizer) for messages, tools in conversations]
    elif len(texts) != len(conversations):
        raise ValueError(f"{len(texts)} texts for {len(conversations)} conversations")
    spans = [_checked_spans(text, messages) for text, (messages, _) in zip(texts, conversations)]
    encodings = _backend_encodings(tokenizer, texts)
    if encodings is None:
        batch = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)
        encodings = getattr(batch, "encodings", None)
    if encodings is None:  # not a fast tokenizer: no encodings to query, so one conversation at a time
        return [encode_chat(messages, tools, tokenizer, max_seq_len, text)
                for (messages, tools), text in zip(conversations, texts)]
    out = []
    for encoding, turn_spans in zip(encodings, spans):
        ids = encoding.ids
        labels = _assistant_labels(ids, encoding, turn_spans)
        out.append({"input_ids": ids[:max_seq_len], "labels": labels[:max_seq_len]})
    return out


def _backend_encodings(tokenizer, texts: Sequence[str]) -> list | None:
    """The Rust tokenizer's encodings of `texts`, called directly: the same call `tokenizer(texts,
    add_special_tokens=False)` makes, without transformers' conversion of every encoding into Python
    lists (about a tenth of the tokenising time). Only while the backend has no truncation or padding
    set, which transformers would otherwise reset for an untruncated call; None for anything else."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or any(getattr(backend, state, True) is not None for state in ("truncation", "padding")):
        return None
    return backend.encode_batch(list(texts), add_special_tokens=False)


def _assistant_labels(ids: list[int], encoding, spans: list[tuple[int, int]]) -> list[int]:
    """encode_chat's labels from a tokenizers Encoding: `bisect_left(starts, a)` and `bisect_right(ends, b)`
    over the token offsets, each offset read from the encoding where bisection looks (a dozen per span)."""
    n = len(ids)

    def start(k: int) -> int:
        return (encoding.token_to_chars(k) or (0, 0))[0]

    def end(k: int) -> int:
        return (encoding.token_to_chars(k) or (0, 0))[1]

    labels = [IGNORE_INDEX] * n
    for a, b in spans:
        lo = bisect_left(range(n), a, key=start)
        hi = bisect_right(range(n), b, key=end)
        if hi > lo:
            labels[lo:hi] = ids[lo:hi]
    return labels


def encode_prompt(messages: list[dict], tools: list | None, tokenizer, **template_kwargs) -> list[int]:
    """Token ids of the conversation followed by the assistant generation prompt.

    Extra keyword arguments go to the chat template (MiniMind's reads `open_thinking`).
    """
    text = render_chat(messages, tools, tokenizer, add_generation_prompt=True, **template_kwargs)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompts(prompts: Sequence[tuple[list[dict], list | None]], tokenizer,
                   template_kwargs: dict | Sequence[dict] | None = None) -> list[list[int]]:
    """`encode_prompt` of each (messages, tools), equal item by item, tokenised in one call.

    `template_kwargs`: one dict for every prompt, or one per prompt (e.g. each prompt's `open_thinking`).
    """
    if not prompts:
        return []
    if template_kwargs is None or isinstance(template_kwargs, dict):
        template_kwargs = [template_kwargs or {}] * len(prompts)
    if len(template_kwargs) != len(prompts):
        raise ValueError(f"{len(template_kwargs)} template_kwargs for {len(prompts)} prompts")
    texts = [render_chat(messages, tools, tokenizer, add_generation_prompt=True, **kwargs)
             for (messages, tools), kwargs in zip(prompts, template_kwargs)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
