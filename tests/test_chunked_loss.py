"""cross_entropy chunked / liger: the loss-only forward gives the full-logits loss and gradients, never
holds more than a chunk of logits, and goes through the model's wrappers (peft, DDP, the CLI's Accelerate)."""
from __future__ import annotations

import copy
import importlib.util
import math
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import DEMO, read_metrics, run_cli
from minimind_scale.data.batching import pad_collate
from minimind_scale.errors import UserError
from minimind_scale.losses.causal_lm import causal_lm_loss
from minimind_scale.losses.chunked import enable_loss_forward
from minimind_scale.models.build import build_model, load_tokenizer

CHUNK = 5  # smaller than a row, so one batch makes several chunks, the last loss-bearing one ragged
SEQ = 16
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def chunked_cfg(rows: int) -> SimpleNamespace:
    return SimpleNamespace(cross_entropy="chunked", batch_size=rows, max_seq_len=SEQ)


def packed_batch(vocab: int) -> dict:
    """Two packed rows (position ids restart at each sample), the second shorter and so padded."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for samples in ([9, 7], [6, 6]):
        ids, labels, pos = [], [], []
        for n in samples:
            x = torch.randint(3, vocab, (n,), generator=g).tolist()
            ids += x
            labels += [-100] * 3 + x[3:]  # a 3-token prompt without loss
            pos += list(range(n))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return pad_collate(rows, 0)


def padded_batch(vocab: int) -> dict:
    """Three unpacked rows of different lengths: right padding, an attention mask, -100 labels on pads."""
    g = torch.Generator().manual_seed(2)
    rows = []
    for n, prompt in ((16, 4), (9, 2), (5, 1)):
        x = torch.randint(3, vocab, (n,), generator=g).tolist()
        rows.append({"input_ids": x, "labels": [-100] * prompt + x[prompt:]})
    return pad_collate(rows, 0)


def reference_loss(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Independent of the code under test: full logits, shifted by slicing, fp32 sum; plus the MoE
    router loss weighted as causal_lm_loss documents (coef · aux · loss-bearing tokens)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    out = model(**inputs, use_cache=False)
    logits, target = out.logits[:, :-1].float(), batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum")
    aux = getattr(out, "aux_loss", None)
    if aux is None:
        return loss, None
    n = (target != -100).sum()
    return loss + model.config.router_aux_loss_coef * aux * n, aux * n


def lm_head_rows(model) -> list[int]:
    """Rows of every logits tensor the output layer produces from now on (appended to the returned list)."""
    rows: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, out: rows.append(out.shape[0]))
    return rows


def assert_same_gradients(ref_model, model) -> None:
    ref = dict(ref_model.named_parameters())
    compared = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None and ref[name].grad is not None, name
        torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
        compared += 1
    assert compared > 0


def compare(ref_model, model, batch: dict, wrapper=None) -> None:
    """Reference loss and gradients on `ref_model`; causal_lm_loss chunked on `model` (or its `wrapper`)."""
    ref_loss, ref_aux = reference_loss(ref_model, batch)
    ref_loss.backward()
    out = causal_lm_loss(wrapper or model, batch, chunked_cfg(batch["input_ids"].shape[0]))
    out.loss_sum.backward()
    torch.testing.assert_close(out.loss_sum, ref_loss, rtol=1e-5, atol=1e-5)
    assert out.loss_sum.dtype == torch.float32
    if ref_aux is not None:
        torch.testing.assert_close(out.metrics["aux_loss"], ref_aux.detach(), rtol=1e-5, atol=1e-7)
    assert_same_gradients(ref_model, model)


def twin(model, chunk: int = CHUNK):
    """A copy with the loss-only forward bound; `model` stays the untouched reference."""
    c = copy.deepcopy(model)
    enable_loss_forward(c, "chunked", chunk_tokens=chunk)
    return c


@pytest.mark.parametrize("make_batch", [packed_batch, padded_batch], ids=["packed", "padded"])
def test_chunked_equals_full_logits(tok, make_batch):
    torch.manual_seed(0)
    model = build_model("tiny", tok, 32, 2)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    chunked = twin(model)
    assert chunked.lm_head.weight is chunked.model.embed_tokens.weight
    batch = make_batch(len(tok))
    compare(model, chunked, batch)

    rows = lm_head_rows(chunked)
    causal_lm_loss(chunked, batch, chunked_cfg(batch["input_ids"].shape[0]))  # forward only: no recomputation

    bearing = int((batch["labels"][:, 1:] != -100).sum())
    assert bearing > 2 * CHUNK and bearing % CHUNK, "the batch should make several chunks, the last ragged"
    # Never more than a chunk of logits; as many lm_head calls as the bound batch×max_seq_len needs,
    # whatever this batch holds (what keeps ZeRO-3's gathers in step across ranks).
    assert max(rows) == CHUNK and sum(rows) == bearing and bearing % CHUNK in rows
    assert len(rows) == math.ceil(batch["input_ids"].shape[0] * SEQ / CHUNK)


def test_plain_calls_still_return_logits(tok):
    torch.manual_seed(0)
    model = build_model("tiny", tok, 32, 1)
    chunked = twin(model)
    enable_loss_forward(chunked, "chunked", chunk_tokens=CHUNK)  # enabling twice does not stack wrappers
    assert chunked.forward.logits_forward.__func__ is type(chunked).forward
    ids = packed_batch(len(tok))["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(chunked(input_ids=ids).logits, model(input_ids=ids).logits)


def test_chunked_moe_includes_router_loss(tok):
    torch.manual_seed(0)
    model = build_model("minimind3-moe", tok, 32, 1)
    assert model.config.num_experts > 1 and model.config.output_router_logits
    compare(model, twin(model), packed_batch(len(tok)))


def test_chunked_under_peft_lora(tok):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(build_model("tiny", tok, 32, 1),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # B starts at zero, which would leave A without a gradient to compare
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    chunked = twin(model)
    compare(model, chunked, padded_batch(len(tok)))
    assert any("lora_A" in n and p.grad.abs().sum() > 0 for n, p in chunked.named_parameters() if p.requires_grad)


def test_chunked_through_ddp(tok, tmp_path):
    """Through DistributedDataParallel's __call__ (one gloo process): its gradient hooks see the output
    layer, tied to the embedding, used by several chunks and recomputed in backward."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = build_model("tiny", tok, 32, 1)
    chunked = twin(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        compare(model, chunked, packed_batch(len(tok)), wrapper=DistributedDataParallel(chunked))
    finally:
        dist.destroy_process_group()


def test_unbound_model_is_refused(tok):
    model = build_model("tiny", tok, 32, 1)
    with pytest.raises(RuntimeError, match="enable_loss_forward"):
        causal_lm_loss(model, packed_batch(len(tok)), chunked_cfg(2))


def test_liger_without_the_package_is_a_user_error(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # importing it now fails, installed or not
    with pytest.raises(UserError, match="install liger-kernel or use cross_entropy chunked"):
        enable_loss_forward(build_model("tiny", tok, 32, 1), "liger")


# --------------------------------------------------------------------------- the command line

CLI = ["sft", "--model", "tiny", "--data_path", str(DEMO / "sft.jsonl"), "--max_steps", "3", "--batch_size", "8",
       "--max_seq_len", "160", "--dtype", "fp32", "--log_interval", "1", "--save_interval", "0", "--num_proc", "1",
       "--learning_rate", "3e-3", "--seed", "7", "--hidden_size", "32", "--num_hidden_layers", "1"]


def test_cli_chunked_matches_full(tmp_path, data_cache):
    for mode in ("full", "chunked"):
        run_cli([*CLI, "--cross_entropy", mode, "--out_dir", str(tmp_path / mode)], data_cache)
    full, chunked = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "chunked")
    assert len(full) == len(chunked) == 3
    for a, b in zip(full, chunked):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert b["tokens"] == a["tokens"]


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None,
                    reason="liger-kernel is installed here")
def test_cli_liger_without_the_package(tmp_path, data_cache):
    proc = run_cli([*CLI, "--cross_entropy", "liger", "--out_dir", str(tmp_path / "liger")], data_cache, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "install liger-kernel or use cross_entropy chunked" in errors[0]
    assert "Traceback" not in proc.stderr
