"""The generation worker of `serve`: one model, one request at a time, text handed back as it comes.

Requests are answered one at a time, in the order they arrive, by a single thread that alone touches
the model. Each request therefore decodes exactly as it would alone (greedy answers do not depend on
what else is queued), per-request seeds are honoured, and no state is shared between requests. The
price is throughput: a request waits for every one ahead of it (see docs/serving.md).

The model is a generation backend (minimind_scale/generation): the worker hands it one prompt at a time,
a token stream that becomes text deltas, the request's seed, and its cancel flag as the stop flag.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from minimind_scale.generation.interface import GenerationBackend, SamplingParams


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


class _TextDeltas:
    """A generation TokenStream: decodes the new tokens as they come and emits the text they add.

    Text that ends inside a multi-byte character waits for the token that completes it, so the deltas
    join into exactly the decoded reply. The decoded window restarts after each newline, which keeps
    the cost per token small on long answers.
    """

    def __init__(self, tokenizer, emit: Callable[[Event], None]):
        self.tokenizer, self.emit = tokenizer, emit
        self.window: list[int] = []
        self.sent = 0

    def put(self, token_ids: list[int]) -> None:
        self.window += token_ids
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


class GenerationWorker:
    """Runs submitted jobs one by one, in arrival order, on the one thread that uses the generation backend
    (whoever made the backend closes it, after `close()`)."""

    def __init__(self, generator: GenerationBackend, tokenizer, max_queue: int):
        self.generator, self.tokenizer = generator, tokenizer
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
        params = SamplingParams(max_new_tokens=g.max_new_tokens, end_ids=(self.tokenizer.eos_token_id,),
                                temperature=g.temperature, top_p=g.top_p, top_k=0)
        out = self.generator.generate([g.prompt_ids], params, seeds=[g.seed],
                                      stream=_TextDeltas(self.tokenizer, job.emit), should_stop=job.cancelled.is_set)
        return Done("stop" if out.finished[0] else "length", int(out.mask[0].sum()))
