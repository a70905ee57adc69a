"""plot (metrics.jsonl -> loss.png) and the tensorboard tracker (report_to tensorboard)."""
from __future__ import annotations

import json
import math

from conftest import DEMO, run_cli
from conftest import cli_in_process as cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"




def fake_run(path, steps: int, scale: float):
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "epoch": s / steps, "loss": scale * math.exp(-s / 10),
                                "lr": 1e-3 * (1 - s / steps),
                                "grad_norm": 1.0, "tokens": 100 * s, "tokens_per_sec": 500 + s, "elapsed_sec": s,
                                "world_size": 1}) + "\n")
    return path


def test_plot_one_and_two_runs(tmp_path, capsys):
    a, b = fake_run(tmp_path / "run_a", 20, 5.0), fake_run(tmp_path / "run_b", 12, 6.0)
    code, err = cli(["plot", "--out_dir", str(a)], capsys)
    assert code == 0, err
    assert (a / "loss.png").read_bytes()[:8] == PNG_MAGIC
    code, err = cli(["plot", "--out_dir", str(a), str(b), "--save", str(tmp_path / "both.png")], capsys)
    assert code == 0, err
    assert (tmp_path / "both.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "both.png").stat().st_size > 10_000


def test_plot_without_metrics_is_a_user_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = cli(["plot", "--out_dir", str(tmp_path / "empty")], capsys)
    assert code == 2 and "metrics.jsonl" in err and "Traceback" not in err, err


def test_report_to_tensorboard_writes_loss_scalars(tmp_path, data_cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    data = tmp_path / "sft32.jsonl"  # a few conversations: tokenising the whole demo set is the slow part
    data.write_text("".join((DEMO / "sft.jsonl").read_text().splitlines(keepends=True)[:32]))
    run_cli(["sft", "--data_path", str(data), "--model", "tiny", "--max_seq_len", "96", "--dtype", "fp32",
             "--max_steps", "3", "--batch_size", "4", "--log_interval", "1", "--num_proc", "1",
             "--out_dir", str(out), "--report_to", "tensorboard"], data_cache)
    files = sorted(out.rglob("events.out.tfevents*"))
    assert files, "no tensorboard event files under out_dir"
    steps = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        if "loss" in acc.Tags()["scalars"]:
            steps.update({e.step: e.value for e in acc.Scalars("loss")})
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(steps) == [1, 2, 3]
    assert all(abs(steps[r["step"]] - r["loss"]) < 1e-5 for r in metrics)


def test_missing_tracker_package_is_a_user_error(tmp_path, data_cache):
    from conftest import run_cli

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    proc = run_cli(["pretrain", "--model", "tiny", "--data_path", str(data), "--out_dir", str(tmp_path / "r"),
                    "--report_to", "swanlab", "--max_steps", "1"], data_cache, check=False)
    assert proc.returncode == 2 and "pip install swanlab" in proc.stderr
