"""`chat`: talk to a trained model, or answer one `--prompt` and exit.

`answer()` is the reusable piece (the demo calls it); `run()` adds loading, the one-shot mode and
the interactive loop on stdin. Every answer goes through the generation seam (`--generation_backend`).
Answers go to stdout; prompts, banners and notices go to stderr, so `chat --prompt ... > answer.txt`
captures the answer alone.
"""
from __future__ import annotations

import re
import sys
from typing import Literal

import torch
from pydantic import Field
from transformers import TextStreamer

from minimind_scale.chat.encoding import encode_prompt
from minimind_scale.chat.markup import THINK_CLOSE, THINK_OPEN, THINK_PROMPT_OPEN
from minimind_scale.config import StrictConfig
from minimind_scale.generation.interface import GenerationBackend, SamplingParams
from minimind_scale.generation.registry import DEFAULT_BACKEND, BackendName, backend_for, load_backend
from minimind_scale.models.yarn import DEFAULT_ORIGINAL_POSITIONS, YarnFactor, YarnOriginalPositions

# A template without thinking support leaves the model to write the (empty) block itself; its
# exact whitespace varies with how far the model has been trained, hence a pattern, not a prefix.
_LEADING_EMPTY_THINK = re.compile(rf"^\s*{re.escape(THINK_OPEN)}\s*{re.escape(THINK_CLOSE)}\s*")
# The longest context assumed when the model's config names none.
FALLBACK_POSITIONS = 32768


class ChatConfig(StrictConfig):
    """Chat with a model directory (a run's final/). With --prompt: print one answer and exit.
    Interactive mode keeps the conversation; type /reset to forget it and /exit (or Ctrl-D) to quit."""

    model: str = Field(..., description="Hugging Face model directory (e.g. out/full_sft/final)")
    adapter: str | None = Field(None, description="a LoRA (peft) adapter directory to apply on top of the model")
    system: str | None = Field(None, description="system prompt opening every conversation")
    prompt: str | None = Field(None, description="answer this once and exit (no interactive loop)")
    max_new_tokens: int = Field(256, ge=1, description="longest answer in tokens")
    temperature: float = Field(0.7, ge=0, description="sampling temperature (0: greedy decoding)")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling mass")
    seed: int | None = Field(None, description="seed for reproducible sampling")
    think: bool = Field(False, description="let the model reason first (open_thinking) and show the reasoning")
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="weights dtype: auto = bf16 on a GPU that supports it, else fp32")
    yarn_factor: YarnFactor = None
    yarn_original_max_position_embeddings: YarnOriginalPositions = DEFAULT_ORIGINAL_POSITIONS
    generation_backend: BackendName = DEFAULT_BACKEND


def strip_empty_think(text: str) -> str:
    return _LEADING_EMPTY_THINK.sub("", text, count=1)


class ChatStreamer(TextStreamer):
    """Prints an answer's tokens as they come (a generation TokenStream, through transformers' TextStreamer
    word-by-word printing), withholding a leading empty think block instead of printing it.

    Text is held back only while it could still become that block, so a real answer appears with
    at most a few tokens of delay.
    """

    def __init__(self, tokenizer, hide_empty_think: bool = True, **kwargs):
        # The backend streams completion tokens only, so there is no prompt to skip.
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True, **kwargs)
        self.hide_empty_think = hide_empty_think
        self._pending: str | None = "" if hide_empty_think else None

    def put(self, token_ids: list[int]) -> None:
        super().put(torch.tensor(token_ids, dtype=torch.long))

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if self._pending is not None:
            self._pending += text
            block = _LEADING_EMPTY_THINK.match(self._pending)
            if block:
                rest = self._pending[block.end():]
                if not rest and not stream_end:
                    return  # more whitespace may follow the block; the answer starts after it
                text, self._pending = rest, None
            elif self._could_become_block(self._pending.lstrip()) and not stream_end:
                return
            else:
                text, self._pending = self._pending, None
        super().on_finalized_text(text, stream_end)
        if stream_end and self.hide_empty_think:
            self._pending = ""  # the streamer is reused for the next answer

    @staticmethod
    def _could_become_block(head: str) -> bool:
        """Whether more text could still turn `head` into an opening think tag + whitespace + its closing tag."""
        if THINK_OPEN.startswith(head):
            return True
        if not head.startswith(THINK_OPEN):
            return False
        return THINK_CLOSE.startswith(head[len(THINK_OPEN):].lstrip())


@torch.inference_mode()
def answer(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.7,
           top_p: float = 0.9, think: bool = False, seed: int | None = None,
           streamer: ChatStreamer | None = None) -> str:
    """The model's reply to `messages` (role/content dicts ending with a user turn). `model` is a generation
    backend, or a module that the hf backend then generates with; `seed` reseeds the sampling first.

    With `think` the reply starts with the reasoning, "<think>\\n...\\n</think>\\n\\n", which is also
    the form to keep in the history (the chat template turns it back into a reasoning block);
    without it, any empty think block is removed.
    """
    generator = backend_for(model, pad_id=tokenizer.pad_token_id)
    template_kwargs = {"open_thinking": True} if think else {}
    prompt_ids = encode_prompt(messages, None, tokenizer, **template_kwargs)
    # top_k is left to the model's generation config, as chat always has.
    params = SamplingParams(max_new_tokens=max_new_tokens, end_ids=(tokenizer.eos_token_id,),
                            temperature=temperature, top_p=top_p)
    if streamer is not None and think:
        # The template already wrote the opening of the think block into the prompt, which is never streamed.
        streamer.on_finalized_text(THINK_PROMPT_OPEN)
    out = generator.generate([prompt_ids], params, seeds=None if seed is None else [seed], stream=streamer)
    text = tokenizer.decode(out.rows()[0], skip_special_tokens=True)
    return (THINK_PROMPT_OPEN + text).rstrip() if think else strip_empty_think(text).strip()


def _trim_history(history: list[dict], system: list[dict], tokenizer, room: int) -> list[dict]:
    """Drop the oldest exchanges until the prompt leaves `room` positions to answer in."""
    # history alternates user/assistant and ends with the new user turn, so pairs come off the front.
    while len(history) > 2 and len(encode_prompt(system + history, None, tokenizer)) > room:
        history = history[2:]
    return history


def run(cfg: ChatConfig) -> None:
    generator, tokenizer = load_backend(cfg.generation_backend, cfg.model, adapter=cfg.adapter, dtype=cfg.dtype,
                                        yarn_factor=cfg.yarn_factor,
                                        yarn_original_max_position_embeddings=cfg.yarn_original_max_position_embeddings)
    try:
        if cfg.prompt is not None:
            _answer_once(generator, tokenizer, cfg)
        else:
            _converse(generator, tokenizer, cfg)
    finally:
        generator.close()


def _system(cfg: ChatConfig) -> list[dict]:
    return [{"role": "system", "content": cfg.system}] if cfg.system else []


def _sampling(cfg: ChatConfig) -> dict:
    return dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, think=cfg.think)


def _answer_once(generator: GenerationBackend, tokenizer, cfg: ChatConfig) -> None:
    reply = answer(generator, tokenizer, _system(cfg) + [{"role": "user", "content": cfg.prompt}], seed=cfg.seed,
                   **_sampling(cfg))
    if not reply:
        print("(the model gave an empty answer)", file=sys.stderr)
    print(reply, flush=True)


def _converse(generator: GenerationBackend, tokenizer, cfg: ChatConfig) -> None:
    """The interactive loop: one streamed answer per line of stdin, the conversation kept until /reset."""
    system = _system(cfg)
    room = max(1, (generator.context_length or FALLBACK_POSITIONS) - cfg.max_new_tokens)
    streamer = ChatStreamer(tokenizer, hide_empty_think=not cfg.think)
    # The session's sampling starts from --seed; later answers go on drawing from the same stream.
    seed = cfg.seed
    history: list[dict] = []
    print(f"chatting with {cfg.model} — /reset forgets the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        sys.stderr.write("\n> ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if line == "":  # EOF
            break
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        history = _trim_history(history, system, tokenizer, room)
        reply = answer(generator, tokenizer, system + history, streamer=streamer, seed=seed, **_sampling(cfg))
        seed = None
        history.append({"role": "assistant", "content": reply})
