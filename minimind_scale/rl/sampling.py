"""Sampling completions from a policy, and the per-token log-probabilities online stages train on.

Sampling goes through the generation seam (minimind_scale/generation): by default transformers' generate on
the policy itself. Prompts are left-padded (so every prompt ends where generation starts) and completions
right-padded. Position ids come from the attention mask, in sampling and in every scoring forward alike, so
a token's log-probability does not depend on how much padding its prompt got.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minimind_scale.generation.interface import GenerationBackend, SamplingParams
from minimind_scale.generation.padding import unpad
from minimind_scale.generation.registry import DEFAULT_BACKEND, backend_for


@dataclass
class Samples:
    """`num_samples` completions per prompt, grouped by prompt (rows g·n … g·n + n − 1 share prompt g)."""

    sequences: torch.Tensor        # [rows, P + T] prompt then completion ids
    attention_mask: torch.Tensor   # [rows, P + T] 1 on real prompt tokens and on completion tokens
    completion_mask: torch.Tensor  # [rows, T] 1 up to and including the first end-of-turn token
    clipped: torch.Tensor          # [rows] bool: no end-of-turn token within the length limit
    prompt_len: int                # P

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_len:]

    def to(self, device) -> Samples:
        return Samples(sequences=self.sequences.to(device), attention_mask=self.attention_mask.to(device),
                       completion_mask=self.completion_mask.to(device), clipped=self.clipped.to(device),
                       prompt_len=self.prompt_len)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, … over the real tokens of each row (left padding gets 0), as generation computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, num_samples: int, max_new_tokens: int,
           temperature: float, top_p: float, top_k: int, end_id: int, pad_id: int,
           backend: GenerationBackend | str = DEFAULT_BACKEND) -> Samples:
    """`num_samples` completions of each left-padded prompt, by `backend` (a name, made on `model`, or a backend
    its owner keeps in step with `model`); tokens after a completion's first `end_id` are padding and masked."""
    params = SamplingParams(max_new_tokens=max_new_tokens, end_ids=(end_id,), temperature=temperature, top_p=top_p,
                            top_k=top_k, num_samples=num_samples)
    out = backend_for(model, backend, pad_id=pad_id).generate(unpad(input_ids, attention_mask), params)
    prompt_ids = input_ids.repeat_interleave(num_samples, dim=0)
    prompt_mask = attention_mask.repeat_interleave(num_samples, dim=0)
    return Samples(sequences=torch.cat([prompt_ids, out.token_ids], dim=1),
                   attention_mask=torch.cat([prompt_mask, out.mask], dim=1),
                   completion_mask=out.mask, clipped=~out.finished, prompt_len=input_ids.shape[1])


def completion_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                        temperature: float = 1.0) -> torch.Tensor:
    """log π(token) of every completion position, [rows, T], at the sampling temperature (fp32)."""
    out = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                use_cache=False)
    return logprobs_from_logits(out.logits, sequences, prompt_len, temperature)


def logprobs_from_logits(logits: torch.Tensor, sequences: torch.Tensor, prompt_len: int,
                         temperature: float = 1.0) -> torch.Tensor:
    """log π of each completion token from the logits divided by the sampling temperature (the distribution
    the tokens were drawn from). No [rows, T, vocab] log-softmax is kept: the picked logit minus the log-sum-exp."""
    logits = logits[:, prompt_len - 1:-1].float() / temperature
    picked = logits.gather(-1, sequences[:, prompt_len:].unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def concat_samples(parts: list[Samples], pad_id: int) -> Samples:
    """Several Samples as one: prompts left-padded to the widest, completions right-padded to the longest."""
    prompt_len = max(s.prompt_len for s in parts)
    width = max(s.completion_mask.shape[1] for s in parts)
    seqs, masks, completion_masks = [], [], []
    for s in parts:
        left, right = prompt_len - s.prompt_len, width - s.completion_mask.shape[1]
        seqs.append(torch.nn.functional.pad(s.sequences, (left, right), value=pad_id))
        masks.append(torch.nn.functional.pad(s.attention_mask, (left, right), value=0))
        completion_masks.append(torch.nn.functional.pad(s.completion_mask, (0, right), value=0))
    return Samples(sequences=torch.cat(seqs), attention_mask=torch.cat(masks),
                   completion_mask=torch.cat(completion_masks), clipped=torch.cat([s.clipped for s in parts]),
                   prompt_len=prompt_len)
