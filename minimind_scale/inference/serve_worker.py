"""The generation worker of `serve`: one model, one request at a time, text handed back as it comes.

Requests are answered one at a time, in the order they arrive, by a single thread that alone touches
the model. Each request therefore decodes exactly as it would alone (greedy answers do not depend on
what else is queued), per-request seeds are honoured, and no state is shared between requests. The
price is throughput: a request waits for every one ahead of it (see README, "Serving").
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer


@dataclass(frozen=True)
class Generation:
    """What to generate: after `prompt_ids`, up to `max_new_tokens`; temperature 0 is greedy."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Done:
    reason: Literal["stop", "length"]
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str


Event = Text | Done | Failed


class QueueFull(Exception):
    """More requests are waiting than the worker accepts."""


class Job:
    """One submitted generation; `cancel()` (the client went away) stops it at the next token."""

    def __init__(self, generation: Generation, emit: Callable[[Event], None]):
        self.generation, self.emit = generation, emit
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


class _TextDeltas(BaseStreamer):
    """Decodes the new tokens as they come and emits the text they add.

    Text that ends inside a multi-byte character waits for the token that completes it, so the deltas
    join into exactly the decoded reply. The decoded window restarts after each newline, which keeps
    the cost per token small on long answers.
    """

    def __init__(self, tokenizer, emit: Callable[[Event], None]):
        self.tokenizer, self.emit = tokenizer, emit
        self.prompt_seen = False
        self.window: list[int] = []
        self.sent = 0

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        self.window += value.reshape(-1).tolist()
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.window, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return
        if len(text) > self.sent:
            self.emit(Text(text[self.sent:]))
        if text.endswith("\n"):
            self.window, self.sent = [], 0
        else:
            self.sent = len(text)


class _Cancelled(StoppingCriteria):
    def __init__(self, flag: threading.Event):
        self.flag = flag

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device)


class GenerationWorker:
    """Owns the model on one thread and runs submitted jobs one by one, in arrival order."""

    def __init__(self, model, tokenizer, max_queue: int):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._current: Job | None = None
        self._thread = threading.Thread(target=self._loop, name="generation", daemon=True)
        self._thread.start()

    def submit(self, generation: Generation, emit: Callable[[Event], None]) -> Job:
        """Queue a generation; its events are passed to `emit` from the worker's thread."""
        job = Job(generation, emit)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None
        return job

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    def close(self) -> None:
        """Cancel the running and the queued generations, and end the thread."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
        if self._current is not None:
            self._current.cancel()
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            self._current = job
            try:
                job.emit(self._generate(job))
            except Exception as e:  # the server stays up; this request gets the error
                job.emit(Failed(f"generation failed ({type(e).__name__}: {e})"))
            self._current = None

    @torch.inference_mode()
    def _generate(self, job: Job) -> Done:
        g = job.generation
        if g.seed is not None:
            from transformers import set_seed

            set_seed(g.seed % 2**32)  # any integer a client sends; numpy's generator takes 32 bits
        sampling = dict(do_sample=True, temperature=g.temperature, top_p=g.top_p, top_k=0) if g.temperature > 0 \
            else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        ids = torch.tensor([g.prompt_ids], dtype=torch.long, device=self.device)
        eos = self.tokenizer.eos_token_id
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=g.max_new_tokens,
                                  eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id,
                                  streamer=_TextDeltas(self.tokenizer, job.emit),
                                  stopping_criteria=StoppingCriteriaList([_Cancelled(job.cancelled)]), **sampling)
        new = out[0, ids.shape[1]:].tolist()
        return Done("stop" if new and new[-1] == eos else "length", len(new))
