"""The generation seam: left padding written once, the completions contract, the registry and its option type,
the one model loader, and the hf backend, which must sample exactly the tokens transformers' generate samples."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from minimind_scale.chat.encoding import encode_prompt
from minimind_scale.errors import UserError
from minimind_scale.generation import registry
from minimind_scale.generation.hf import HFBackend
from minimind_scale.generation.interface import Completions, SamplingParams
from minimind_scale.generation.padding import left_pad, unpad
from minimind_scale.generation.registry import backend_class, backend_for, create_backend, register_backend
from minimind_scale.inference.chat import ChatConfig
from minimind_scale.inference.loading import load_chat_model, pick_dtype
from minimind_scale.models.build import load_tokenizer, preset_config, save_hf
from minimind_scale.rl import prompts
from minimind_scale.rl.sampling import completion_logprobs, sample

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["hi", "what is two plus two, tell me", "name a colour"]


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer): a random 2-layer model on the bundled tokenizer, fp32, CPU."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(None)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(preset_config("tiny", len(tokenizer), tokenizer), dtype=torch.float32)
    return model.eval(), tokenizer


def prompt_ids(tokenizer, question: str) -> list[int]:
    return encode_prompt([{"role": "user", "content": question}], None, tokenizer)


# --------------------------------------------------------------------------- padding, completions, parameters


def test_left_pad_right_aligns_and_unpad_inverts_it():
    ids, mask = left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    assert unpad(ids, mask) == [[5, 6, 7], [8], []]


def test_the_prompt_batch_is_left_padded_by_the_one_implementation(tiny):
    _, tokenizer = tiny

    class Cfg:
        seed, thinking_ratio, max_prompt_len = 0, 0.5, 64

    rows = [prompts.encode({"prompt": q}, tokenizer, Cfg) for q in QUESTIONS]
    batch = prompts.collate(rows, tokenizer, Cfg)
    ids, mask = left_pad([r["prompt_ids"] for r in rows], tokenizer.pad_token_id)
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)
    assert unpad(batch["input_ids"], batch["attention_mask"]) == [r["prompt_ids"] for r in rows]


def test_completions_end_at_the_first_end_token_and_pad_what_follows():
    generated = torch.tensor([[5, 2, 7, 9], [5, 6, 7, 8], [2, 2, 3, 4]])
    out = Completions.cut_at_end(generated, (2,), pad_id=0, logprobs=torch.full((3, 4), -1.0))
    assert out.token_ids.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert out.mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert out.finished.tolist() == [True, False, True]
    assert out.logprobs.tolist() == [[-1, -1, 0, 0], [-1, -1, -1, -1], [-1, 0, 0, 0]]
    assert out.rows() == [[5, 2], [5, 6, 7, 8], [2]]
    # any of several end tokens ends a completion
    assert Completions.cut_at_end(generated, (2, 7), pad_id=0).rows() == [[5, 2], [5, 6, 7], [2]]

    joined = Completions.concat([out, Completions.cut_at_end(torch.tensor([[9, 9]]), (2,), pad_id=0)], pad_id=0)
    assert joined.rows() == [[5, 2], [5, 6, 7, 8], [2], [9, 9]]
    assert joined.token_ids.shape == (4, 4) and joined.finished.tolist() == [True, False, True, False]
    assert joined.logprobs is None  # not every part had them


def test_sampling_params_refuse_what_no_backend_can_do():
    assert SamplingParams(max_new_tokens=4, end_ids=(2,), temperature=0).greedy
    for bad in (dict(max_new_tokens=0, end_ids=(2,)), dict(max_new_tokens=4, end_ids=()),
                dict(max_new_tokens=4, end_ids=(None,)), dict(max_new_tokens=4, end_ids=(2,), temperature=-1),
                dict(max_new_tokens=4, end_ids=(2,), num_samples=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# --------------------------------------------------------------------------- the registry and the option


def test_backends_are_found_by_name_and_an_unknown_name_is_a_user_error(tiny, monkeypatch):
    model, tokenizer = tiny
    assert backend_class("hf") is HFBackend
    made = create_backend("hf", model, pad_id=tokenizer.pad_token_id)
    assert isinstance(made, HFBackend) and made.model is model
    assert backend_for(model, made, pad_id=0) is made and backend_for(made, pad_id=0) is made
    with pytest.raises(UserError, match=r"unknown generation backend 'hff' \(did you mean 'hf'\?\) \(registered: hf"):
        create_backend("hff", model, pad_id=0)

    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    register_backend("by-path", "minimind_scale.generation.hf:HFBackend")  # imported on first use
    assert backend_class("by-path") is HFBackend
    register_backend("not-a-backend", "minimind_scale.generation.padding:left_pad")
    with pytest.raises(TypeError, match="not a GenerationBackend subclass"):
        backend_class("not-a-backend")
    with pytest.raises(ValueError, match="module:Class"):
        register_backend("bad", "no_colon_here")


def test_the_generation_backend_option_accepts_registered_names_only():
    assert ChatConfig(model="m").generation_backend == "hf"
    with pytest.raises(ValidationError, match="unknown generation backend 'vllm'.*registered: hf"):
        ChatConfig(model="m", generation_backend="vllm")


# --------------------------------------------------------------------------- the loader


def test_one_loader_picks_the_dtype_and_refuses_a_missing_directory(tmp_path):
    assert pick_dtype("fp32") is torch.float32 and pick_dtype("bf16") is torch.bfloat16
    assert pick_dtype("fp16") is torch.float16
    assert pick_dtype("auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(UserError, match="model directory not found"):
        load_chat_model(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no config.json"):
        load_chat_model(str(tmp_path))


def test_the_hf_backend_loads_a_directory_where_it_is_told(tiny, tmp_path):
    model, tokenizer = tiny
    save_hf(model, tokenizer, tmp_path / "m")
    generator, loaded_tokenizer = registry.load_backend("hf", str(tmp_path / "m"), dtype="fp32", device="cpu")
    assert isinstance(generator, HFBackend) and generator.pad_id == loaded_tokenizer.pad_token_id
    assert generator.context_length == model.config.max_position_embeddings
    assert not generator.model.training and next(generator.model.parameters()).device.type == "cpu"


# --------------------------------------------------------------------------- the hf backend


def test_sampling_draws_the_tokens_transformers_generate_draws(tiny):
    """rl.sampling.sample through the hf backend against the generate call it replaced, on one seed."""
    model, tokenizer = tiny
    ids, mask = left_pad([prompt_ids(tokenizer, q) for q in QUESTIONS], tokenizer.pad_token_id)
    options = dict(temperature=0.8, top_p=0.85, top_k=50, max_new_tokens=12)

    def generate(end_id: int) -> torch.Tensor:
        torch.manual_seed(0)
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, num_return_sequences=2,
                              eos_token_id=end_id, pad_token_id=tokenizer.pad_token_id, use_cache=True, **options)

    # End at a token the first row draws early on this seed, so that completions end at different places.
    end_id = int(generate(tokenizer.eos_token_id)[0, ids.shape[1] + 3])
    reference = generate(end_id)
    torch.manual_seed(0)
    samples = sample(model, ids, mask, num_samples=2, end_id=end_id, pad_id=tokenizer.pad_token_id, **options)
    P = ids.shape[1]
    assert samples.prompt_len == P and torch.equal(samples.sequences[:, :P], reference[:, :P])
    completion = reference[:, P:]
    assert samples.completion_ids.shape == completion.shape
    kept = samples.completion_mask.bool()
    assert torch.equal(samples.completion_ids[kept], completion[kept])
    assert (samples.completion_ids[~kept] == tokenizer.pad_token_id).all()
    assert not samples.clipped[0] and not kept.all()


def test_a_seed_makes_a_prompt_s_sample_independent_of_the_rest_of_the_call(tiny):
    model, tokenizer = tiny
    generator = HFBackend(model, pad_id=tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=8, end_ids=(tokenizer.eos_token_id,), temperature=1.0, top_k=0)
    a, b = (prompt_ids(tokenizer, q) for q in QUESTIONS[:2])
    both = generator.generate([a, b], params, seeds=[1, 2]).rows()
    assert both[0] == generator.generate([a], params, seeds=[1]).rows()[0]
    assert both[1] == generator.generate([b], params, seeds=[2 + 2**32]).rows()[0]  # any integer, modulo 2**32
    assert generator.generate([a], params, seeds=[3]).rows() != [both[0]]


def test_a_stream_receives_the_completion_and_the_stop_flag_ends_it(tiny):
    model, tokenizer = tiny
    generator = HFBackend(model, pad_id=tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=6, end_ids=(tokenizer.eos_token_id,), temperature=0)

    class Collect:
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, token_ids):
            self.tokens += token_ids

        def end(self):
            self.ended = True

    stream = Collect()
    out = generator.generate([prompt_ids(tokenizer, "hi")], params, stream=stream)
    assert stream.tokens == out.rows()[0] and stream.ended
    stopped = generator.generate([prompt_ids(tokenizer, "hi")], params, should_stop=lambda: True)
    assert stopped.rows() == [out.rows()[0][:1]] and not stopped.finished[0]
    with pytest.raises(ValueError, match="one-prompt"):
        generator.generate([[1], [2]], params, stream=Collect())


def test_log_probs_are_those_of_the_sampling_distribution_and_leave_the_tokens_alone(tiny):
    model, tokenizer = tiny
    generator = HFBackend(model, pad_id=tokenizer.pad_token_id)
    prompts_ = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    plain = SamplingParams(max_new_tokens=6, end_ids=(234,), temperature=0.7, top_p=1.0, top_k=0, num_samples=2)
    torch.manual_seed(3)
    without = generator.generate(prompts_, plain)
    torch.manual_seed(3)
    out = generator.generate(prompts_, SamplingParams(**{**plain.__dict__, "logprobs": True}))
    assert torch.equal(out.token_ids, without.token_ids) and torch.equal(out.mask, without.mask)
    # the same numbers a training forward gives at the sampling temperature
    ids, mask = left_pad(prompts_, tokenizer.pad_token_id)
    sequences = torch.cat([ids.repeat_interleave(2, dim=0), out.token_ids], dim=1)
    attention = torch.cat([mask.repeat_interleave(2, dim=0), out.mask], dim=1)
    with torch.no_grad():
        scored = completion_logprobs(model, sequences, attention, ids.shape[1], temperature=0.7)
    kept = out.mask.bool()
    torch.testing.assert_close(out.logprobs[kept], scored[kept], atol=1e-4, rtol=1e-4)
    assert (out.logprobs[~kept] == 0).all()


def test_update_weights_makes_the_backend_generate_with_the_new_module(tiny):
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny
    torch.manual_seed(99)
    other = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32).eval()
    params = SamplingParams(max_new_tokens=8, end_ids=(tokenizer.eos_token_id,), temperature=1.0, top_k=0)
    question = [prompt_ids(tokenizer, "hi")]
    generator = HFBackend(model, pad_id=tokenizer.pad_token_id)
    before = generator.generate(question, params, seeds=[0]).rows()
    generator.update_weights(other)
    after = generator.generate(question, params, seeds=[0]).rows()
    assert after == HFBackend(other, pad_id=tokenizer.pad_token_id).generate(question, params, seeds=[0]).rows()
    assert after != before
