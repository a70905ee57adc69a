"""Black-box: bad input on the real command line ends with exit code 2 and one readable message that
names the place (file:line, or the field), never a traceback, and never leaves a `final/` behind.

Each check reads the outcome of one `python -m minimind_scale ...` subprocess (a "run"). Start-up
(torch + transformers) costs several seconds, so:
  * checks that the product reports together share a run: one data file holds several kinds of bad
    record (each check looks for its own `file:line` entry), one command line holds several bad
    flags (every problem is reported at once);
  * all selected runs start together, a few at a time, slow ones first, when the first test asks
    for its result. MINIMIND_TEST_JOBS sets how many run at once.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

COMMON = ["--model", "tiny", "--max_steps", "1", "--batch_size", "2", "--max_seq_len", "64", "--dtype", "fp32"]
TIMEOUT = 300

GOOD_TEXT = [{"text": f"Sample number {i} says hello to the small model."} for i in range(6)]
GOOD_CHAT = [{"conversations": [{"role": "user", "content": f"What is {i} + 1?"},
                                {"role": "assistant", "content": f"{i} + 1 is {i + 1}."}]} for i in range(6)]


def write_jsonl(path: Path, lines: list) -> Path:
    """Each item: a dict/list (dumped as JSON), a str (written as is) or bytes (written raw)."""
    with open(path, "wb") as f:
        for item in lines:
            if isinstance(item, bytes):
                f.write(item + b"\n")
            elif isinstance(item, str):
                f.write(item.encode() + b"\n")
            else:
                f.write(json.dumps(item).encode() + b"\n")
    return path


def train(stage: str, tmp: Path, data: list, *extra: str) -> list[str]:
    return [stage, "--data_path", *map(str, data), "--out_dir", str(tmp / "out"), *COMMON, *extra]


# --------------------------------------------------------------------------- runs


@dataclass
class RunDef:
    build: Callable[[Path], list[str]]     # writes its files under tmp, returns the CLI arguments
    cost: int = 1                          # 1: fails at start-up, 2: fails after data/model set-up, 3: trains


RUNS: dict[str, RunDef] = {}


def run(name: str, cost: int = 1):
    def deco(fn):
        RUNS[name] = RunDef(fn, cost)
        return fn
    return deco


@run("missing_data_file")
def _(tmp):
    return train("pretrain", tmp, [tmp / "nope.jsonl"])


@run("empty_data_file")
def _(tmp):
    (tmp / "empty.jsonl").write_bytes(b"")
    return train("sft", tmp, [tmp / "empty.jsonl"])


@run("blank_lines_only")
def _(tmp):
    (tmp / "blank.jsonl").write_text("\n  \n\n")
    return train("pretrain", tmp, [tmp / "blank.jsonl"])


@run("data_path_is_directory")
def _(tmp):
    (tmp / "adir").mkdir()
    return train("pretrain", tmp, [tmp / "adir"])


# pretrain records: lines 1-2 valid, then one bad record of each kind, then more bad ones than the
# message lists. second.jsonl comes first on the command line, with a bad line 2.
PRETRAIN_BAD = {
    3: '{"text": "no closing brace"',
    5: {"content": "no text key"},
    6: {"text": 12345},
    7: {"text": "   "},
    8: b'{"text": "caf\xe9 au lait"}',
    9: ["text", "an array"],
    10: "42",
    **{n: {"txt": "typo in the key"} for n in range(12, 20)},
}
PRETRAIN_N_BAD = len(PRETRAIN_BAD) + 1


@run("pretrain_records")
def _(tmp):
    rows = [PRETRAIN_BAD.get(n, GOOD_TEXT[n % len(GOOD_TEXT)]) for n in range(1, 23)]
    write_jsonl(tmp / "pre.jsonl", rows)
    write_jsonl(tmp / "second.jsonl", [GOOD_TEXT[0], "not json at all", GOOD_TEXT[1]])
    return train("pretrain", tmp, [tmp / "second.jsonl", tmp / "pre.jsonl"])


SFT_BAD = {
    2: {"prompt": "hi", "answer": "a record of neither format"},
    3: {"conversations": "user: hi"},
    4: {"messages": {"role": "user", "content": "hi"}},
    5: {"conversations": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]},
    6: {"conversations": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}]},
    7: {"conversations": ["hi", "hello"]},
    8: {"conversations": [{"role": "user", "content": "hi"}]},
    9: [{"role": "user", "content": "hi"}],
}


@run("sft_records")
def _(tmp):
    rows = [SFT_BAD.get(n, GOOD_CHAT[n % len(GOOD_CHAT)]) for n in range(1, 12)]
    write_jsonl(tmp / "sft.jsonl", rows)
    return train("sft", tmp, [tmp / "sft.jsonl"])


@run("bad_flags")
def _(tmp):
    data = write_jsonl(tmp / "data.jsonl", GOOD_TEXT)
    return train("pretrain", tmp, [data], "--learning_rat", "1e-3", "--batch_size", "abc", "--learning_rate", "-1",
                 "--pakcing")


@run("unknown_stage")
def _(tmp):
    return ["sftt", "--data_path", "x.jsonl"]


@run("missing_config_file")
def _(tmp):
    data = write_jsonl(tmp / "data.jsonl", GOOD_TEXT)
    return train("pretrain", tmp, [data], "--config", str(tmp / "nope.yaml"))


@run("config_flag_without_value", cost=3)
def _(tmp):
    data = write_jsonl(tmp / "data.jsonl", GOOD_TEXT)
    return train("pretrain", tmp, [data], "--config")


@run("bad_yaml")
def _(tmp):
    data = write_jsonl(tmp / "data.jsonl", GOOD_TEXT)
    (tmp / "run.yaml").write_text("epochs: 1\nlerning_rate: 0.001\n# a comment\nwarmup_steps: soon\n"
                                  f"out_dir: {tmp / 'out'}\n")
    return ["pretrain", "--config", str(tmp / "run.yaml"), "--data_path", str(data), *COMMON]


@run("tokenizer_directory_missing")
def _(tmp):
    data = write_jsonl(tmp / "data.jsonl", GOOD_TEXT)
    return train("pretrain", tmp, [data], "--tokenizer", str(tmp / "no_tok"))


@run("tokenizer_directory_empty")
def _(tmp):
    data = write_jsonl(tmp / "data.jsonl", GOOD_TEXT)
    (tmp / "tok").mkdir()
    return train("pretrain", tmp, [data], "--tokenizer", str(tmp / "tok"))


@run("model_unknown", cost=2)
def _(tmp):
    data = write_jsonl(tmp / "data.jsonl", GOOD_TEXT)
    return train("pretrain", tmp, [data], "--model", "tinyy")


@run("resume_not_a_checkpoint", cost=2)
def _(tmp):
    data = write_jsonl(tmp / "data.jsonl", GOOD_TEXT)
    (tmp / "ckpt").mkdir()
    (tmp / "ckpt" / "model.safetensors").write_bytes(b"")
    return train("pretrain", tmp, [data], "--resume", str(tmp / "ckpt"))


@run("deepspeed_config_missing", cost=2)
def _(tmp):
    data = write_jsonl(tmp / "data.jsonl", GOOD_TEXT)
    return train("pretrain", tmp, [data], "--deepspeed", str(tmp / "zero9.json"))


@run("flash_attention_without_gpu", cost=2)
def _(tmp):
    data = write_jsonl(tmp / "data.jsonl", GOOD_TEXT)
    return train("pretrain", tmp, [data], "--attn_implementation", "flash_attention_2")


@run("skip_bad_records", cost=3)
def _(tmp):
    data = write_jsonl(tmp / "data.jsonl", [*GOOD_TEXT[:3], '{"text": broken', *GOOD_TEXT[3:]])
    return train("pretrain", tmp, [data], "--skip_bad_records", "true")


@run("prepare_bad_record")
def _(tmp):
    data = write_jsonl(tmp / "data.jsonl", [GOOD_TEXT[0], {"text": None}])
    return ["prepare", "pretrain", "--data_path", str(data), "--max_seq_len", "64"]


# --------------------------------------------------------------------------- checks


@dataclass
class Check:
    run: str
    anywhere: tuple[str, ...] = ()             # substrings anywhere in the output; "{tmp}" = the run's directory
    lines: tuple[tuple[str, ...], ...] = ()    # each group: substrings that must sit on one output line
    rc: int = 2
    extra: Callable[[Path, subprocess.CompletedProcess], None] | None = None
    xfail: str | None = None


def on_line(*parts: str) -> tuple[tuple[str, ...], ...]:
    return (parts,)


def check_several_bad_lines(tmp: Path, res) -> None:
    err = res.stderr
    pre = f"{tmp}/pre.jsonl"
    for n in sorted(PRETRAIN_BAD)[:5]:  # the first ones, each with its line number
        assert f"{pre}:{n}:" in err, f"line {n} not reported:\n{err}"
    listed = len(re.findall(r"\.jsonl:\d+:", err))
    assert 5 <= listed < PRETRAIN_N_BAD, \
        f"{listed} bad lines listed of {PRETRAIN_N_BAD}: the first ones only, please\n{err}"
    assert re.search(rf"\b{PRETRAIN_N_BAD}\b[^\n]*(malformed|bad|invalid)", err), \
        f"no total of {PRETRAIN_N_BAD}:\n{err}"


def check_skipped_run(tmp: Path, res) -> None:
    out = res.stdout + res.stderr
    final = tmp / "out" / "final"
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file(), out[-3000:]
    assert re.search(r"\b1 bad\b|skipped\D{0,20}\b1\b|\b1\b\D{0,20}skipped", out), \
        f"skipped count not logged:\n{out[-3000:]}"
    assert re.search(rf"\b{len(GOOD_TEXT)} records\b", out), out[-3000:]
    report = json.loads((tmp / "out" / "data_report.json").read_text())
    assert report["records"] == len(GOOD_TEXT) and report["skipped"] == 1, report
    assert sum(report["reasons"].values()) == 1 and "JSON" in next(iter(report["reasons"])), report


PRE, SECOND, SFT, YAML = "{tmp}/pre.jsonl", "{tmp}/second.jsonl", "{tmp}/sft.jsonl", "{tmp}/run.yaml"

CHECKS: dict[str, Check] = {
    # data files
    "missing_data_file": Check("missing_data_file", ("{tmp}/nope.jsonl",)),
    "empty_data_file": Check("empty_data_file", ("{tmp}/empty.jsonl", "empty")),
    "blank_lines_only": Check("blank_lines_only", ("{tmp}/blank.jsonl",)),
    "data_path_is_directory": Check("data_path_is_directory", ("{tmp}/adir",)),
    # pretrain records (one run)
    "malformed_json_line_3": Check("pretrain_records", lines=on_line(f"{PRE}:3:", "JSON")),
    "malformed_json_in_second_file": Check("pretrain_records", lines=on_line(f"{SECOND}:2:", "JSON")),
    "pretrain_record_without_text": Check("pretrain_records", lines=on_line(f"{PRE}:5:", "text")),
    "pretrain_text_not_string": Check("pretrain_records", lines=on_line(f"{PRE}:6:", "text")),
    "pretrain_text_empty": Check("pretrain_records", lines=on_line(f"{PRE}:7:", "text")),
    "non_utf8_line": Check("pretrain_records", lines=on_line(f"{PRE}:8:", "UTF-8")),
    "json_array_not_object": Check("pretrain_records", lines=on_line(f"{PRE}:9:", "object")),
    "json_scalar_not_object": Check("pretrain_records", lines=on_line(f"{PRE}:10:", "object")),
    "several_bad_lines": Check("pretrain_records", extra=check_several_bad_lines),
    # sft records (one run)
    "sft_record_of_neither_format": Check("sft_records", lines=on_line(f"{SFT}:2:", "conversations", "messages",
                                                                          "text")),
    "sft_conversations_not_list": Check("sft_records", lines=on_line(f"{SFT}:3:", "conversations", "list")),
    "sft_messages_not_list": Check("sft_records", lines=on_line(f"{SFT}:4:", "messages", "list")),
    "sft_role_not_allowed": Check("sft_records", lines=on_line(f"{SFT}:5:", "conversations[1].role", "bot")),
    "sft_content_not_string": Check("sft_records", lines=on_line(f"{SFT}:6:", "conversations[0].content")),
    "sft_turn_not_object": Check("sft_records", lines=on_line(f"{SFT}:7:", "conversations[0]")),
    "sft_no_assistant_turn": Check("sft_records", lines=on_line(f"{SFT}:8:", "conversations", "assistant")),
    "sft_json_array_not_object": Check("sft_records", lines=on_line(f"{SFT}:9:", "object")),
    "prepare_reports_bad_record": Check("prepare_bad_record", lines=on_line("{tmp}/data.jsonl:2:", "text")),
    # command line and config (bad_flags: every problem reported at once)
    "unknown_field_did_you_mean": Check("bad_flags", lines=on_line("learning_rat'", "did you mean 'learning_rate'")),
    "unknown_bare_flag_did_you_mean": Check("bad_flags", lines=on_line("pakcing", "did you mean 'packing'")),
    "wrong_type": Check("bad_flags", lines=on_line("batch_size", "abc")),
    "out_of_range": Check("bad_flags", lines=on_line("'learning_rate'", "-1")),
    "unknown_stage_did_you_mean": Check("unknown_stage", lines=on_line("sftt", "did you mean 'sft'")),
    "missing_config_file": Check("missing_config_file", ("{tmp}/nope.yaml",)),
    "config_flag_without_value": Check("config_flag_without_value", ("--config",)),
    "yaml_unknown_key": Check("bad_yaml", lines=on_line(f"{YAML}:2:", "lerning_rate", "learning_rate")),
    "yaml_bad_value": Check("bad_yaml", lines=on_line(f"{YAML}:4:", "warmup_steps", "soon")),
    "tokenizer_directory_missing": Check("tokenizer_directory_missing", ("{tmp}/no_tok",)),
    "tokenizer_directory_empty": Check("tokenizer_directory_empty", ("{tmp}/tok",)),
    "model_neither_preset_nor_directory": Check("model_unknown", lines=on_line("tinyy", "preset")),
    "resume_not_a_checkpoint": Check("resume_not_a_checkpoint", lines=on_line("resume", "{tmp}/ckpt")),
    "deepspeed_config_missing": Check("deepspeed_config_missing", ("{tmp}/zero9.json",)),
    "flash_attention_without_gpu": Check("flash_attention_without_gpu", lines=on_line("flash_attention_2", "CUDA")),
    # skipping
    "skip_bad_records_completes": Check("skip_bad_records", rc=0, extra=check_skipped_run),
}


# --------------------------------------------------------------------------- running


def cli_env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MINIMIND_SCALE_PLUGINS")
           and not k.startswith("ACCELERATE_")}
    env.update(MINIMIND_SCALE_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    return env


def run_cli(argv: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minimind_scale", *argv], capture_output=True, text=True,
                          errors="replace", timeout=TIMEOUT, env=cli_env(tmp / "cache"), cwd=tmp)


def _workers() -> int:
    return max(1, int(os.environ.get("MINIMIND_TEST_JOBS", max(2, min(4, os.cpu_count() or 1)))))


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """Start the run of every selected check (slow ones first); each test waits on its own."""
    wanted: list[str] = []
    for item in request.session.items:
        name = item.callspec.params.get("name") if hasattr(item, "callspec") else None
        if item.module is request.module and name in CHECKS and CHECKS[name].run not in wanted:
            wanted.append(CHECKS[name].run)
    wanted.sort(key=lambda n: -RUNS[n].cost)
    pool = ThreadPoolExecutor(_workers())
    started: dict[str, tuple[list[str], Path, Future]] = {}
    for name in wanted:
        tmp = tmp_path_factory.mktemp(name)
        argv = RUNS[name].build(tmp)
        started[name] = (argv, tmp, pool.submit(run_cli, argv, tmp))
    yield started
    pool.shutdown(wait=True, cancel_futures=True)


def _params():
    for name, c in CHECKS.items():
        marks = [pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []
        yield pytest.param(name, marks=marks, id=name)


def test_every_run_is_checked():
    assert {c.run for c in CHECKS.values()} == set(RUNS)


@pytest.mark.parametrize("name", list(_params()))
def test_bad_input(name, runs):
    c = CHECKS[name]
    argv, tmp, future = runs[c.run]
    res = future.result()
    out = res.stdout + res.stderr
    shown = f"argv: {' '.join(argv)}\nexit {res.returncode}\n--- stderr (tail)\n{res.stderr[-4000:]}"
    assert "Traceback" not in out, shown
    assert res.returncode == c.rc, shown
    if c.rc == 2:
        assert re.search(r"^error: \S", res.stderr, re.M), f"no one-line 'error: ...' message\n{shown}"
    for s in c.anywhere:
        s = s.format(tmp=tmp)
        assert s in out, f"expected {s!r} in the message\n{shown}"
    for group in c.lines:
        group = [s.format(tmp=tmp) for s in group]
        assert any(all(s in line for s in group) for line in out.splitlines()), \
            f"expected one line with all of {group}\n{shown}"
    if c.rc != 0:
        # nothing that could be mistaken for a good run
        assert not (tmp / "out" / "final").exists(), shown
        ckpts = tmp / "out" / "checkpoints"
        assert not ckpts.exists() or not any(ckpts.iterdir()), shown
    if c.extra is not None:
        c.extra(tmp, res)
