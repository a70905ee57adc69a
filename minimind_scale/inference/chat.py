"""`chat`: talk to a trained model, or answer one `--prompt` and exit.

`answer()` is the reusable piece (the demo calls it); `run()` adds loading, the one-shot mode and
the interactive loop on stdin. Answers go to stdout; prompts, banners and notices go to stderr, so
`chat --prompt ... > answer.txt` captures the answer alone.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from transformers import TextStreamer

from minimind_scale.chat.conversation import encode_prompt
from minimind_scale.config import StrictConfig
from minimind_scale.errors import UserError
from minimind_scale.models.build import is_model_dir, load_tokenizer
from minimind_scale.models.yarn import DEFAULT_ORIGINAL_POSITIONS, YarnFactor, YarnOriginalPositions, load_config

THINK_OPEN = "<think>\n"
EMPTY_THINK = "<think>\n\n</think>\n\n"
# A template without thinking support leaves the model to write the (empty) block itself; its
# exact whitespace varies with how far the model has been trained, hence a pattern, not a prefix.
_LEADING_EMPTY_THINK = re.compile(r"^\s*<think>\s*</think>\s*")


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


def strip_empty_think(text: str) -> str:
    return _LEADING_EMPTY_THINK.sub("", text, count=1)


class ChatStreamer(TextStreamer):
    """TextStreamer that withholds a leading empty think block instead of printing it.

    Text is held back only while it could still become that block, so a real answer appears with
    at most a few tokens of delay.
    """

    def __init__(self, tokenizer, hide_empty_think: bool = True, **kwargs):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, **kwargs)
        self.hide_empty_think = hide_empty_think
        self._pending: str | None = "" if hide_empty_think else None

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
        """Whether more text could still turn `head` into "<think>" + whitespace + "</think>"."""
        if "<think>".startswith(head):
            return True
        if not head.startswith("<think>"):
            return False
        return "</think>".startswith(head[len("<think>"):].lstrip())


def pick_dtype(dtype: str) -> torch.dtype:
    if dtype == "fp32":
        return torch.float32
    if dtype == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def load_chat_model(model_dir: str, adapter: str | None = None, dtype: str = "auto", yarn_factor: float | None = None,
                    yarn_original_max_position_embeddings: int = DEFAULT_ORIGINAL_POSITIONS):
    """(model, tokenizer) ready for generation, on the GPU when there is one; `yarn_factor` extends the
    context with YaRN (see yarn.py)."""
    from transformers import AutoModelForCausalLM

    if not Path(model_dir).is_dir():
        raise UserError(f"model directory not found: {model_dir}")
    if not is_model_dir(model_dir):
        raise UserError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    tokenizer = load_tokenizer(None, model_dir)
    config = load_config(model_dir, yarn_factor, yarn_original_max_position_embeddings)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=pick_dtype(dtype),
                                                     **({"config": config} if config is not None else {}))
    except (OSError, ValueError) as e:
        raise UserError(f"{model_dir}: the model failed to load ({type(e).__name__}: {e})") from None
    if adapter is not None:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"{adapter}: not a LoRA adapter directory (no adapter_config.json)")
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"{adapter}: the adapter does not fit {model_dir} ({type(e).__name__}: {e})") from None
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, tokenizer


@torch.inference_mode()
def answer(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.7,
           top_p: float = 0.9, think: bool = False, seed: int | None = None,
           streamer: TextStreamer | None = None) -> str:
    """The model's reply to `messages` (role/content dicts ending with a user turn).

    With `think` the reply starts with the reasoning, "<think>\\n...\\n</think>\\n\\n", which is also
    the form to keep in the history (the chat template turns it back into a reasoning block);
    without it, any empty think block is removed.
    """
    template_kwargs = {"open_thinking": True} if think else {}
    prompt_ids = encode_prompt(messages, None, tokenizer, **template_kwargs)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    if streamer is not None and think:
        # The template already wrote "<think>\n" into the prompt, which the streamer skips.
        streamer.on_finalized_text(THINK_OPEN)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, streamer=streamer, **sampling)
    text = tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
    return (THINK_OPEN + text).rstrip() if think else strip_empty_think(text).strip()


def _trim_history(history: list[dict], system: list[dict], tokenizer, room: int) -> list[dict]:
    """Drop the oldest exchanges until the prompt leaves `room` positions to answer in."""
    # history alternates user/assistant and ends with the new user turn, so pairs come off the front.
    while len(history) > 2 and len(encode_prompt(system + history, None, tokenizer)) > room:
        history = history[2:]
    return history


def run(cfg: ChatConfig) -> None:
    model, tokenizer = load_chat_model(cfg.model, cfg.adapter, cfg.dtype, cfg.yarn_factor,
                                       cfg.yarn_original_max_position_embeddings)
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    sampling = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, think=cfg.think)
    if cfg.seed is not None:
        from transformers import set_seed

        set_seed(cfg.seed)

    if cfg.prompt is not None:
        reply = answer(model, tokenizer, system + [{"role": "user", "content": cfg.prompt}], **sampling)
        if not reply:
            print("(the model gave an empty answer)", file=sys.stderr)
        print(reply, flush=True)
        return

    max_positions = getattr(model.config, "max_position_embeddings", None) or 32768
    room = max(1, max_positions - cfg.max_new_tokens)
    streamer = ChatStreamer(tokenizer, hide_empty_think=not cfg.think)
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
        reply = answer(model, tokenizer, system + history, streamer=streamer, **sampling)
        history.append({"role": "assistant", "content": reply})
