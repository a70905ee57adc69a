"""`HFBackend`: transformers' `generate` on the live module, with the KV cache, the default backend ("hf").

Sampling draws from the process's one torch RNG, as it always has: a checkpoint saves that RNG and a resume
restores it, so a resumed run samples the same tokens. A per-prompt seed reseeds it (transformers'
`set_seed`) right before that prompt's own `generate` call. Position ids come from the attention mask inside
`generate`, as `rl.sampling.position_ids_from_mask` computes them for scoring.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, set_seed
from transformers.generation.streamers import BaseStreamer

from minimind_scale.generation.interface import Completions, GenerationBackend, SamplingParams, TokenStream
from minimind_scale.generation.padding import left_pad
from minimind_scale.inference.loading import load_chat_model

SEED_MODULUS = 2**32  # numpy's generator, which set_seed also seeds, takes 32 bits; a client may send any integer


class HFBackend(GenerationBackend):
    """Generates with the module it holds; receiving a trainer's weights is holding its live module."""

    def __init__(self, model, *, pad_id: int):
        self.model, self.pad_id = model, pad_id

    @classmethod
    def from_model(cls, model, *, pad_id: int) -> HFBackend:
        return cls(model, pad_id=pad_id)

    @classmethod
    def from_pretrained(cls, model_dir: str, **options) -> tuple[HFBackend, object]:
        model, tokenizer = load_chat_model(model_dir, **options)
        return cls(model, pad_id=tokenizer.pad_token_id), tokenizer

    def update_weights(self, model) -> None:
        self.model = model

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config.get_text_config(), "max_position_embeddings", None)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 seeds: Sequence[int | None] | None = None, stream: TokenStream | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Completions:
        if stream is not None and (len(prompts) != 1 or params.num_samples != 1):
            raise ValueError("only a one-prompt, one-sample generation can be streamed")
        if seeds is not None and any(s is not None for s in seeds):
            if len(seeds) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
            if len(prompts) > 1:  # one generator: a seed holds for its prompt only when that prompt runs alone
                return Completions.concat([self.generate([p], params, seeds=[s], should_stop=should_stop)
                                           for p, s in zip(prompts, seeds)], self.pad_id)
            set_seed(seeds[0] % SEED_MODULUS)
        return self._generate(prompts, params, stream, should_stop)

    def _generate(self, prompts, params: SamplingParams, stream: TokenStream | None,
                  should_stop: Callable[[], bool] | None) -> Completions:
        device = next(self.model.parameters()).device
        ids, mask = left_pad(prompts, self.pad_id)
        extra = {}
        if stream is not None:
            extra["streamer"] = _StreamBridge(stream)
        if should_stop is not None:
            extra["stopping_criteria"] = StoppingCriteriaList([_StopWhen(should_stop)])
        if params.logprobs:
            extra.update(output_scores=True, return_dict_in_generate=True)
        end = params.end_ids[0] if len(params.end_ids) == 1 else list(params.end_ids)
        out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                  max_new_tokens=params.max_new_tokens, num_return_sequences=params.num_samples,
                                  eos_token_id=end, pad_token_id=self.pad_id, use_cache=True,
                                  **sampling_kwargs(params), **extra)
        sequences = out.sequences if params.logprobs else out
        generated = sequences[:, ids.shape[1]:]
        logprobs = _picked_logprobs(out.scores, generated) if params.logprobs else None
        return Completions.cut_at_end(generated, params.end_ids, self.pad_id, logprobs)


def sampling_kwargs(params: SamplingParams) -> dict:
    """`generate`'s sampling arguments. Greedy unsets the others, which a model's generation config may set;
    top_k None leaves the model's own default in force."""
    if params.greedy:
        return dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    kwargs = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p)
    if params.top_k is not None:
        kwargs["top_k"] = params.top_k
    return kwargs


@torch.no_grad()
def _picked_logprobs(scores: tuple[torch.Tensor, ...], generated: torch.Tensor) -> torch.Tensor:
    """log-prob of each generated token under the processed scores it was drawn from (after temperature,
    top-k and top-p), one step at a time so no [rows, T, vocab] tensor is kept."""
    steps = [torch.log_softmax(step.float(), dim=-1).gather(-1, generated[:, t:t + 1]).squeeze(-1)
             for t, step in enumerate(scores)]
    return torch.stack(steps, dim=1)


class _StreamBridge(BaseStreamer):
    """transformers' streamer calls -> a TokenStream: `generate` first hands over the prompt, which is dropped."""

    def __init__(self, stream: TokenStream):
        self.stream, self.prompt_seen = stream, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.stream.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.stream.end()


class _StopWhen(StoppingCriteria):
    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)
