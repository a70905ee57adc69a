"""What a generation backend takes and gives back, and the abstract `GenerationBackend` every backend implements.

Prompts are lists of token ids (a backend pads them its own way); completions come back as right-padded
tensors with a mask that is 1 up to and including each completion's first end token, rows grouped by prompt.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to continue every prompt of one call. `temperature` 0 is greedy decoding (top_p and top_k unused)."""

    max_new_tokens: int
    end_ids: tuple[int, ...]   # a completion ends at the first of these, which it keeps
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None   # 0: no limit; None: the model's own default (its generation config)
    num_samples: int = 1       # completions per prompt
    logprobs: bool = False     # also return each token's log-prob under the distribution it was drawn from

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if not self.end_ids or not all(isinstance(i, int) for i in self.end_ids):
            raise ValueError(f"end_ids must name at least one token id, not {self.end_ids!r}")
        if self.temperature < 0 or self.num_samples < 1:
            raise ValueError(f"temperature {self.temperature} / num_samples {self.num_samples} out of range")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completions:
    """`num_samples` completions per prompt: rows g·n … g·n + n − 1 continue prompt g. The tensors are on the
    device the backend generates on (for a backend made `from_model`, the module's)."""

    token_ids: torch.Tensor               # [rows, T] each completion, padding after its first end token
    mask: torch.Tensor                    # [rows, T] long: 1 up to and including the first end token
    finished: torch.Tensor                # [rows] bool: an end token came within max_new_tokens
    logprobs: torch.Tensor | None = None  # [rows, T] fp32 when SamplingParams.logprobs; 0 where mask is 0

    @classmethod
    def cut_at_end(cls, generated: torch.Tensor, end_ids: Sequence[int], pad_id: int,
                   logprobs: torch.Tensor | None = None) -> Completions:
        """Completions from raw generated columns: whatever follows a row's first end token becomes padding."""
        is_end = torch.isin(generated, torch.tensor(list(end_ids), device=generated.device))
        has_end = is_end.any(dim=1)
        width = generated.shape[1]
        first_end = torch.where(has_end, is_end.int().argmax(dim=1), torch.full_like(has_end, width, dtype=torch.long))
        mask = (torch.arange(width, device=generated.device)[None, :] <= first_end[:, None]).long()
        token_ids = torch.where(mask.bool(), generated, torch.full_like(generated, pad_id))
        if logprobs is not None:
            logprobs = torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs))
        return cls(token_ids=token_ids, mask=mask, finished=has_end, logprobs=logprobs)

    @classmethod
    def concat(cls, parts: Sequence[Completions], pad_id: int) -> Completions:
        """Several calls' completions as one, in order, right-padded to the longest."""
        width = max(p.token_ids.shape[1] for p in parts)

        def padded(tensors: list[torch.Tensor], value) -> torch.Tensor:
            return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])

        logprobs = None if any(p.logprobs is None for p in parts) else padded([p.logprobs for p in parts], 0.0)
        return cls(token_ids=padded([p.token_ids for p in parts], pad_id), mask=padded([p.mask for p in parts], 0),
                   finished=torch.cat([p.finished for p in parts]), logprobs=logprobs)

    def rows(self) -> list[list[int]]:
        """Each completion's tokens, its end token included, without padding."""
        lengths = self.mask.sum(dim=1).tolist()
        return [ids[:n] for ids, n in zip(self.token_ids.tolist(), lengths)]


class TokenStream(Protocol):
    """Receives a one-prompt generation's new tokens as they are decoded (never the prompt), then `end()`."""

    def put(self, token_ids: list[int]) -> None: ...

    def end(self) -> None: ...


class GenerationBackend(ABC):
    """Something that continues token-id prompts. Subclasses are registered by name (registry.py).

    Two ways to make one: `from_model`, on a live module whose weights a trainer keeps changing (the backend
    then receives them through `update_weights`), and `from_pretrained`, on a model directory for the
    inference commands, which also returns the directory's tokenizer.
    """

    @classmethod
    @abstractmethod
    def from_model(cls, model, *, pad_id: int) -> GenerationBackend:
        """A backend generating with `model`'s current weights; `pad_id` pads prompts and completions."""

    @classmethod
    @abstractmethod
    def from_pretrained(cls, model_dir: str, **options) -> tuple[GenerationBackend, object]:
        """(backend, tokenizer) of a model directory; `options` are inference.loading.load_chat_model's
        (adapter, dtype, yarn_factor, yarn_original_max_position_embeddings, device)."""

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 seeds: Sequence[int | None] | None = None, stream: TokenStream | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Completions:
        """`params.num_samples` completions of each prompt. `seeds[g]` (when given and not None) makes prompt g's
        sampling reproducible whatever else is in the call; `stream` receives a one-prompt, one-sample call's
        tokens as they come; `should_stop()` turning true ends the call early (completions cut where they are)."""

    @abstractmethod
    def update_weights(self, model) -> None:
        """Generate from now on with `model`'s weights (a trainer calls it after its optimizer steps)."""

    @property
    @abstractmethod
    def context_length(self) -> int | None:
        """Most positions the model reads (prompt and completion together), when the model says."""

    def close(self) -> None:
        """Release what the backend holds (an engine, its processes, its memory); the default holds nothing."""
        return None
