"""Choosing the attention kernel: auto never picks one that cannot run, an explicit one that cannot run is refused."""
from __future__ import annotations

import importlib.util

import pytest

from minimind_scale.errors import UserError
from minimind_scale.models.attention import resolve_attention

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_auto_is_sdpa_on_a_cpu(precision):
    assert resolve_attention("auto", precision, on_cuda=False) == "sdpa"


def test_auto_on_a_gpu_takes_flash_attention_only_in_half_precision_and_when_installed():
    assert resolve_attention("auto", "fp32", on_cuda=True) == "sdpa"
    assert resolve_attention("auto", "bf16", on_cuda=True) == ("flash_attention_2" if HAS_FLASH_ATTN else "sdpa")


@pytest.mark.parametrize("name", ["sdpa", "eager"])
def test_mask_based_kernels_run_anywhere(name):
    assert resolve_attention(name, "fp32", on_cuda=False) == name


@pytest.mark.parametrize("name, precision, on_cuda, message", [
    ("flash_attention_2", "bf16", False, "needs a CUDA GPU"),
    ("flash_attention_3", "bf16", False, "needs a CUDA GPU"),
    ("flash_attention_2", "fp32", True, "bf16 or fp16"),
])
def test_flash_attention_that_cannot_run_is_refused(name, precision, on_cuda, message):
    with pytest.raises(UserError, match=message):
        resolve_attention(name, precision, on_cuda=on_cuda)


@pytest.mark.skipif(HAS_FLASH_ATTN, reason="flash-attn is installed here")
def test_flash_attention_without_the_package_names_it():
    with pytest.raises(UserError, match="flash-attn is not installed"):
        resolve_attention("flash_attention_2", "bf16", on_cuda=True)
