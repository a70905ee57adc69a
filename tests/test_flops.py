"""The FLOPs model behind `mfu`, checked against PyTorch's own count of a real forward + backward."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minimind_scale.models.build import build_model, load_tokenizer
from minimind_scale.training.flops import device_peak_flops, train_flops_per_token


@pytest.mark.parametrize("preset", ["tiny", "minimind3-moe"])
def test_train_flops_per_token_matches_the_counted_matmuls(preset, one_thread):
    torch.manual_seed(0)
    model = build_model(preset, load_tokenizer(None), hidden_size=64, num_hidden_layers=2)
    # Eager attention is plain matmuls, which the counter sees (it has no formula for the CPU SDPA kernel).
    model.set_attn_implementation("eager")
    if getattr(model.config, "num_experts", 0):
        model.set_experts_implementation("eager")  # a loop of F.linear per expert, also countable
    batch, seq = 2, 48
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids, use_cache=False)
        out.logits.float().sum().backward()
    predicted = train_flops_per_token(model.config, seq) * batch * seq
    assert predicted == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_frozen_weights_cost_no_weight_gradient():
    model = build_model("tiny", load_tokenizer(None))
    full = train_flops_per_token(model.config, 64)
    frozen = train_flops_per_token(model.config, 64, trainable_fraction=0)
    attention = 12 * model.config.num_hidden_layers * 64 * model.config.num_attention_heads * model.config.head_dim
    assert (frozen - attention) / (full - attention) == pytest.approx(4 / 6)


def test_peak_flops_override_and_unknown_device():
    assert device_peak_flops("bf16", override_tflops=2.0) == 2e12
    if not torch.cuda.is_available():
        assert device_peak_flops("fp32") is None
