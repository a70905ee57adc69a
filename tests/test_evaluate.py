"""`eval`: its numbers equal an independent per-record computation, whatever the batching, packing
flag or process count."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from minimind_scale.errors import UserError
from minimind_scale.inference.evaluate import EvalConfig, detect_stage, run

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "minimind_scale" / "assets" / "demo"
SFT_RECORDS = 40
PRETRAIN_RECORDS = 13  # odd, so two processes get shards of different sizes
SFT_LEN = 64
PRETRAIN_LEN = 40  # short enough that some texts are truncated


def _env(cache: Path) -> dict:
    return dict(os.environ, MINIMIND_SCALE_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def _head(src: Path, dst: Path, n: int) -> Path:
    with open(src, encoding="utf-8") as f:
        dst.write_text("".join(next(f) for _ in range(n)), encoding="utf-8")
    return dst


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    sft = _head(DEMO / "sft.jsonl", root / "sft.jsonl", SFT_RECORDS)
    pretrain = _head(DEMO / "pretrain.jsonl", root / "pretrain.jsonl", PRETRAIN_RECORDS)
    cmd = [sys.executable, "-m", "minimind_scale", "sft", "--model", "tiny", "--data_path", str(sft),
           "--out_dir", str(root / "run"), "--max_steps", "5", "--batch_size", "4", "--max_seq_len", "64",
           "--dtype", "fp32", "--log_interval", "1", "--learning_rate", "1e-3", "--num_proc", "1"]
    proc = subprocess.run(cmd, env=_env(root / "cache"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    yield {"model": root / "run" / "final", "sft": sft, "pretrain": pretrain, "cache": root / "cache", "root": root}
    shutil.rmtree(root, ignore_errors=True)


def _eval(capsys, work, data: Path, **overrides) -> dict:
    cfg = EvalConfig(model=str(work["model"]), data_path=[str(data)], cache_dir=str(work["cache"]), **overrides)
    capsys.readouterr()
    run(cfg)
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- the reference


def _sft_ids_labels(tokenizer, record: dict, max_len: int) -> tuple[list[int], list[bool]]:
    """Render with the chat template; a token bears loss iff it lies wholly inside an assistant reply,
    from after "<|im_start|>assistant\\n" through "<|im_end|>\\n"."""
    text = tokenizer.apply_chat_template(record["conversations"], tokenize=False)
    spans, header, pos = [], "<|im_start|>assistant\n", 0
    while (pos := text.find(header, pos)) != -1:
        start = pos + len(header)
        end = text.index("<|im_end|>", start) + len("<|im_end|>")
        end += text.startswith("\n", end)
        spans.append((start, end))
        pos = end
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    bears = [any(a <= s and e <= b for a, b in spans) for s, e in enc["offset_mapping"]]
    return enc["input_ids"][:max_len], bears[:max_len]


def _pretrain_ids_labels(tokenizer, record: dict, max_len: int) -> tuple[list[int], list[bool]]:
    ids = ([tokenizer.bos_token_id] + tokenizer(record["text"], add_special_tokens=False)["input_ids"]
           + [tokenizer.eos_token_id])
    ids = ids[:max_len]
    return ids, [True] * len(ids)


@torch.no_grad()
def _reference(model_dir: Path, data: Path, encode, max_len: int) -> tuple[float, int, int]:
    """Every record alone (no padding, no batching): summed CE over shifted loss-bearing positions."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    total, tokens, records = 0.0, 0, 0
    for line in data.read_text(encoding="utf-8").splitlines():
        ids, bears = encode(tokenizer, json.loads(line), max_len)
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0]
        target_bears = torch.tensor(bears[1:])  # position t predicts token t+1
        total += F.cross_entropy(logits[:-1][target_bears], x[0, 1:][target_bears], reduction="sum").item()
        tokens += int(target_bears.sum())
        records += 1
    return total / tokens, tokens, records


@pytest.fixture(scope="module")
def sft_reference(work):
    return _reference(work["model"], work["sft"], _sft_ids_labels, SFT_LEN)


@pytest.fixture(scope="module")
def pretrain_reference(work):
    return _reference(work["model"], work["pretrain"], _pretrain_ids_labels, PRETRAIN_LEN)


def test_reference_labels_one_record_by_hand(work):
    tokenizer = AutoTokenizer.from_pretrained(str(work["model"]))
    record = json.loads(work["sft"].read_text(encoding="utf-8").splitlines()[0])
    assert record["conversations"][1]["content"] == "The capital of Peru is Lima."
    ids, bears = _sft_ids_labels(tokenizer, record, 10_000)
    first = bears.index(True)
    assert all(bears[first:]) and not any(bears[:first])
    assert tokenizer.decode(ids[:first]).endswith(
        "Which city is the capital of Peru?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(ids[first:]) == "<think>\n\n</think>\n\nThe capital of Peru is Lima.<|im_end|>\n"


# --------------------------------------------------------------------------- eval against it


def test_sft_loss_matches_independent_computation(capsys, work, sft_reference):
    assert detect_stage(str(work["sft"])) == "full_sft"
    out = _eval(capsys, work, work["sft"], max_seq_len=SFT_LEN)
    loss, tokens, records = sft_reference
    assert out["tokens"] == tokens and out["records"] == records == SFT_RECORDS
    assert out["loss"] == pytest.approx(loss, rel=1e-5)
    assert out["ppl"] == pytest.approx(torch.tensor(loss, dtype=torch.float64).exp().item(), rel=1e-5)


def test_pretrain_loss_matches_independent_computation(capsys, work, pretrain_reference):
    assert detect_stage(str(work["pretrain"])) == "pretrain"
    out = _eval(capsys, work, work["pretrain"], max_seq_len=PRETRAIN_LEN)
    loss, tokens, records = pretrain_reference
    assert out["tokens"] == tokens and out["records"] == records == PRETRAIN_RECORDS
    assert out["loss"] == pytest.approx(loss, rel=1e-5)


def test_batch_size_and_packing_do_not_change_the_numbers(capsys, work, sft_reference):
    one = _eval(capsys, work, work["sft"], max_seq_len=SFT_LEN, batch_size=1)
    eight = _eval(capsys, work, work["sft"], max_seq_len=SFT_LEN, batch_size=8)
    packed = _eval(capsys, work, work["sft"], max_seq_len=SFT_LEN, batch_size=8, packing=True)
    for out in (eight, packed):
        assert out["tokens"] == one["tokens"] and out["records"] == one["records"]
        assert out["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert one["loss"] == pytest.approx(sft_reference[0], rel=1e-5)


def test_explicit_stage_overrides_detection(capsys, work, pretrain_reference):
    # A chat file read as pretraining text is malformed (no "text"): the stage was really used. (Read as chat
    # data, a pretraining file is valid: the SFT family takes {"text"} records, for replay.)
    with pytest.raises(UserError, match="text"):
        _eval(capsys, work, work["sft"], max_seq_len=PRETRAIN_LEN, stage="pretrain")
    out = _eval(capsys, work, work["pretrain"], max_seq_len=PRETRAIN_LEN, stage="pretrain")
    assert out["tokens"] == pretrain_reference[1]
    as_sft = _eval(capsys, work, work["pretrain"], max_seq_len=PRETRAIN_LEN, stage="sft")
    assert as_sft["tokens"] == pretrain_reference[1] and as_sft["loss"] == pytest.approx(out["loss"], rel=1e-6)


def test_user_mistakes_are_user_errors(capsys, work, tmp_path):
    with pytest.raises(UserError, match="not a Hugging Face model directory"):
        _eval(capsys, {**work, "model": tmp_path / "missing"}, work["sft"])
    with pytest.raises(UserError, match="data file not found"):
        _eval(capsys, work, tmp_path / "missing.jsonl")


def test_cli_single_and_two_processes_agree(work, pretrain_reference):
    args = ["-m", "minimind_scale", "eval", "--model", str(work["model"]), "--data_path", str(work["pretrain"]),
            "--max_seq_len", str(PRETRAIN_LEN), "--batch_size", "4", "--cache_dir", str(work["cache"])]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(torchrun + args, env=_env(work["cache"]), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # rank 0 only
    out = json.loads(lines[-1])
    loss, tokens, records = pretrain_reference
    assert out["tokens"] == tokens and out["records"] == records
    assert out["loss"] == pytest.approx(loss, rel=1e-5)
