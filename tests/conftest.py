"""Shared helpers: run the real command line in subprocesses, offline, with a private data cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEMO = REPO / "minimind_scale" / "assets" / "demo"
FAULT_PLUGIN = REPO / "tests" / "plugins" / "fault_injection.py"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared (real data, MiniMind tokenizer) is absent")


CI_REQUIREMENTS = ("fastapi", "uvicorn", "openai", "selenium", "xdist", "schemathesis", "gguf", "llama_cpp")


def pytest_sessionstart(session):
    """Under CI=true, what a module-level skip would hide fails the run at once instead."""
    if os.environ.get("CI") != "true":
        return
    import importlib.util
    import shutil

    missing = [name for name in CI_REQUIREMENTS if importlib.util.find_spec(name) is None]
    missing += [tool for tool in ("chromium", "chromedriver", "go") if shutil.which(tool) is None]
    missing += [] if SHARED.is_dir() else [str(SHARED)]
    if missing:
        raise pytest.UsageError(f"CI=true but these are missing (an install step failed): {', '.join(missing)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skipped test is a failure: CI installs every optional package and lays ../shared beside
    the checkout, so a skip there means a broken install step, not an optional feature."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (a missing package or data set is an install failure): {reason}"


def reference_labels(input_ids: list[int], tok) -> list[int]:
    """MiniMind's labelling rule, on token ids alone (independent of encode_chat's character spans):
    label by scanning token ids: after each assistant header, through the closing `<|im_end|>\\n`."""
    header = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    closer = tok("<|im_end|>\n", add_special_tokens=False).input_ids
    end_only = closer[:1]
    labels = [-100] * len(input_ids)
    i, n = 0, len(input_ids)
    while i < n:
        if input_ids[i : i + len(header)] == header:
            j = i + len(header)
            while j < n and input_ids[j : j + len(end_only)] != end_only:
                j += 1
            assert j < n, "assistant turn never closed"
            stop = j + (len(closer) if input_ids[j : j + len(closer)] == closer else len(end_only))
            labels[i + len(header) : stop] = input_ids[i + len(header) : stop]
            i = stop
        else:
            i += 1
    return labels


def cli_env(cache: Path, **extra) -> dict:
    """The environment of a CLI run; a MINIMIND_SCALE_TEST_* switch also loads the fault-injection plugin."""
    env = dict(os.environ)
    env.update(MINIMIND_SCALE_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **extra)
    if any(k.startswith("MINIMIND_SCALE_TEST_") for k in extra):
        plugins = [p for p in env.get("MINIMIND_SCALE_PLUGINS", "").split(os.pathsep) if p]
        env["MINIMIND_SCALE_PLUGINS"] = os.pathsep.join(plugins + [str(FAULT_PLUGIN)])
    return env


def run_cli(args: list[str], cache: Path, nproc: int = 1, timeout: int = 600, check: bool = True,
            **env_extra) -> subprocess.CompletedProcess:
    """`python -m minimind_scale ARGS`, or under torchrun with `nproc` CPU processes."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "minimind_scale", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "minimind_scale", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=cli_env(cache, **env_extra))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def cli_in_process(args: list[str], capsys) -> tuple[int, str]:
    """A tool command through the real entry point, in this process: a subprocess per call would spend
    most of its time importing torch and transformers. Returns (exit code, stderr)."""
    code, _, err = cli_output_in_process(args, capsys)
    return code, err


def cli_output_in_process(args: list[str], capsys) -> tuple[int, str, str]:
    """As cli_in_process, returning (exit code, stdout, stderr)."""
    from minimind_scale.cli import main

    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def one_thread():
    """A <1M-parameter model gains nothing from intra-op threads, and on a busy machine their
    synchronisation makes every forward several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def varied_sft(tmp_path_factory) -> Path:
    """Conversations of 1-4 turns from the bundled demo data, so token counts differ a lot between
    samples: a mean of per-batch means would then differ from the token mean."""
    rows = [json.loads(line) for line in (DEMO / "sft.jsonl").read_text().splitlines()[:200]]
    out = tmp_path_factory.mktemp("data") / "varied_sft.jsonl"
    with open(out, "w") as f:
        i = 0
        for n in range(48):
            turns = 1 + (n * 7) % 4
            conv = []
            for r in rows[i:i + turns]:
                conv += r["conversations"][-2:]
            i += turns
            f.write(json.dumps({"conversations": conv}) + "\n")
    return out


AGENT_DATA = REPO / "tests" / "data" / "agent"
AGENT_TOOLS = REPO / "examples" / "agent_tools.py"


@pytest.fixture(scope="session")
def tool_memorised_model(tmp_path_factory, data_cache) -> tuple[Path, Path, Path]:
    """(model_dir, tasks_file, tools_file): a tiny model (hidden 64, 2 layers, the bundled tokenizer, whose
    chat template renders as MiniMind's) that `full_sft` trained until it has memorised one tool-using
    conversation, tests/data/agent/tool_sft.jsonl: the system turn declares calculate_math, the user asks
    "What is 37 * 43?", the assistant calls calculate_math {"expression": "37 * 43"}, the tool answers
    {"result": "1591"}, the assistant says "37 * 43 = 1591.". tasks_file (tests/data/agent/tasks.jsonl) is
    that prompt as an agent_rl task with gt ["1591"]; tools_file is examples/agent_tools.py. Played out
    greedily with those tools, the model calls the tool, reads its result and answers; about 20 s of CPU."""
    import shutil

    from minimind_scale.agent.records import read_agent_tasks
    from minimind_scale.agent.tools import load_tools

    sft = json.loads((AGENT_DATA / "tool_sft.jsonl").read_text())
    task = read_agent_tasks(AGENT_DATA / "tasks.jsonl")[0]
    # The memorised conversation must be the task's prompt followed by what the real tool returns.
    turns = sft["conversations"]
    assert [t["content"] for t in turns[:2]] == [m["content"] for m in task.messages]
    assert json.loads(turns[0]["tools"]) == task.tools
    call = turns[2]["tool_calls"][0]
    with load_tools(AGENT_TOOLS) as tools:
        assert tools.call(call["name"], call["arguments"]).content == turns[3]["content"]

    root = tmp_path_factory.mktemp("tool_model")
    data = root / "sft.jsonl"
    shutil.copy(AGENT_DATA / "tool_sft.jsonl", data)
    run_cli(["full_sft", "--model", "tiny", "--hidden_size", "64", "--num_hidden_layers", "2", "--data_path", str(data),
             "--out_dir", str(root / "run"), "--max_steps", "150", "--batch_size", "1", "--max_seq_len", "640",
             "--packing", "false", "--learning_rate", "1e-2", "--min_lr_ratio", "0.5", "--warmup_steps", "0",
             "--dtype", "fp32", "--num_proc", "1", "--seed", "0", "--save_interval", "0", "--log_interval", "50",
             # memorised exactly as a generation prompt renders it: with the empty <think> block kept
             "--empty_think_ratio", "1"],
            data_cache)
    return root / "run" / "final", AGENT_DATA / "tasks.jsonl", AGENT_TOOLS
