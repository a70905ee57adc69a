"""Running a GGUF file in llama.cpp (llama-cpp-python's build of it) next to the same model in transformers:
token ids, teacher-forced log-probabilities and greedy continuations, each computed on both sides alike."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TRAIN_FILES = ["sft_en_alpaca_demo.jsonl", "sft_zh_alpaca_demo.jsonl"]


OPEN: list = []  # every llama.cpp model loaded, closed by close_all() before the interpreter tears down


def llama(path: Path, vocab_only: bool = False, n_ctx: int = 512):
    from llama_cpp import Llama

    model = Llama(model_path=str(path), vocab_only=vocab_only, n_ctx=n_ctx, n_batch=n_ctx, logits_all=not vocab_only,
                  n_threads=1, n_threads_batch=1, seed=0, verbose=False)
    OPEN.append(model)
    return model


def close_all() -> None:
    while OPEN:
        OPEN.pop().close()


def llama_ids(vocab, text: str) -> list[int]:
    """llama.cpp's tokenisation, parsing special tokens as transformers does (`add_special_tokens=False`)."""
    return vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def llama_logprobs(model, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] log-probabilities of the next token after each position, from llama.cpp's logits."""
    model.reset()
    model.eval(ids)
    logits = np.asarray(model.scores[:len(ids)], dtype=np.float64)
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


@torch.no_grad()
def hf_logprobs(model, ids: list[int]) -> np.ndarray:
    logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):  # no stop token: both sides continue for exactly n tokens
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def llama_greedy(model, prompt: list[int], n: int) -> list[int]:
    model.reset()
    model.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(model.scores[model.n_tokens - 1])))
        model.eval([out[-1]])
    return out


def hf_reference(hf_model, prompts: list[list[int]], n: int) -> list[tuple[list[int], np.ndarray]]:
    """Per prompt: transformers' greedy continuation of n tokens and the log-probabilities of its tokens."""
    reference = []
    for prompt in prompts:
        ours = hf_greedy(hf_model, prompt, n)
        full = prompt + ours
        reference.append((ours, hf_logprobs(hf_model, full)[np.arange(len(prompt) - 1, len(full) - 1), ours]))
    return reference


def agreement(reference, gguf_model, prompts: list[list[int]]) -> dict:
    """How often llama.cpp's greedy continuation equals transformers' (`hf_reference`), and the mean |log-prob
    gap| of the transformers continuation's tokens, teacher-forced through llama.cpp."""
    same, gaps = 0, []
    for prompt, (ours, our_logprobs) in zip(prompts, reference):
        same += llama_greedy(gguf_model, prompt, len(ours)) == ours
        full = prompt + ours
        theirs = llama_logprobs(gguf_model, full)[np.arange(len(prompt) - 1, len(full) - 1), ours]
        gaps.append(np.abs(our_logprobs - theirs))
    return {"agree": same, "prompts": len(prompts), "mean_logprob_gap": float(np.concatenate(gaps).mean())}


def read_jsonl(name: str, count: int, start: int = 0) -> list[dict]:
    with open(SHARED_DATA / name, encoding="utf-8") as f:
        lines = [line for _, line in zip(range(start + count), f)]
    return [json.loads(line) for line in lines[start:]]


def write_training_conversations(path: Path) -> Path:
    """The 32 shared conversations (16 English, 16 Chinese) the GGUF tests' models are trained to reproduce."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for name in TRAIN_FILES
                            for r in read_jsonl(name, 16)))
    return path


def greedy_prompts(tokenizer) -> list[list[int]]:
    """20 chat prompts (10 English, 10 Chinese): the user turns of trained conversations, as generation prompts."""
    from minimind_scale.chat.template import render_chat

    prompts = []
    for name in TRAIN_FILES:
        for record in read_jsonl(name, 10):
            user = [m for m in record["conversations"] if m["role"] == "user"][:1]
            text = render_chat(user, None, tokenizer, add_generation_prompt=True)
            prompts.append(tokenizer(text, add_special_tokens=False).input_ids[-160:])
    return prompts
