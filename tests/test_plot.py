"""plot (metrics.jsonl -> loss.png) and the tensorboard tracker (report_to tensorboard)."""
from __future__ import annotations

import json
import math

from conftest import DEMO, run_cli
from conftest import cli_in_process as cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OLD_PANELS = ["loss", "learning rate", "tokens / s"]


def training_row(step: int, steps: int, scale: float) -> dict:
    return {"step": step, "epoch": step / steps, "loss": scale * math.exp(-step / 10), "lr": 1e-3 * (1 - step / steps),
            "grad_norm": 1.0, "tokens": 100 * step, "tokens_per_sec": 500 + step, "elapsed_sec": step,
            "world_size": 1}


def write_rows(path, rows: list[dict]):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def fake_run(path, steps: int, scale: float):
    return write_rows(path, [training_row(s, steps, scale) for s in range(1, steps + 1)])


def with_evals(steps: int, every: int, eval_row) -> list[dict]:
    """Training rows with an evaluation row after every `every`-th step, as the engine logs them."""
    rows = []
    for s in range(1, steps + 1):
        rows.append(training_row(s, steps, 5.0))
        if s % every == 0:
            rows.append({"step": s, **eval_row(s), "time/eval_sec": 0.25})
    return rows


def lm_eval(step: int) -> dict:
    return {"eval/val/loss": 4.0 - step / 10, "eval/val/ppl": math.exp(4.0 - step / 10),
            "eval/web/loss": 5.0 - step / 20, "eval/web/ppl": math.exp(5.0 - step / 20)}


def online_eval(step: int) -> dict:
    return {"eval/val/reward": step / 100, "eval/val/reward_accuracy": 0.5 + step / 100}


def lines_of(ax) -> dict:
    """label -> (steps, values) of every line drawn in one panel."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def series(rows: list[dict], key: str) -> tuple[list, list]:
    kept = [r for r in rows if r.get(key) is not None]
    return [r["step"] for r in kept], [r[key] for r in kept]


def test_plot_one_and_two_runs(tmp_path, capsys):
    a, b = fake_run(tmp_path / "run_a", 20, 5.0), fake_run(tmp_path / "run_b", 12, 6.0)
    code, err = cli(["plot", "--out_dir", str(a)], capsys)
    assert code == 0, err
    assert (a / "loss.png").read_bytes()[:8] == PNG_MAGIC
    code, err = cli(["plot", "--out_dir", str(a), str(b), "--save", str(tmp_path / "both.png")], capsys)
    assert code == 0, err
    assert (tmp_path / "both.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "both.png").stat().st_size > 10_000


def test_a_run_without_eval_rows_gets_exactly_the_training_panels():
    from minimind_scale.training.plot import draw

    rows = [training_row(s, 12, 6.0) for s in range(1, 13)]
    axes = draw([("run_a", rows)]).axes
    assert [ax.get_ylabel() for ax in axes] == OLD_PANELS
    for ax, key in zip(axes, ["loss", "lr", "tokens_per_sec"]):
        assert lines_of(ax) == {"run_a": series(rows, key)}
    assert axes[0].get_title() == "run_a" and axes[-1].get_xlabel() == "optimizer step"


def test_eval_losses_join_the_loss_panel_and_perplexities_are_left_out():
    from minimind_scale.training.plot import draw

    rows = with_evals(20, 5, lm_eval)
    axes = draw([("run_a", rows)]).axes
    assert [ax.get_ylabel() for ax in axes] == OLD_PANELS
    loss_panel = lines_of(axes[0])
    assert list(loss_panel) == ["run_a", "run_a eval/val/loss", "run_a eval/web/loss"]
    assert loss_panel["run_a"] == series([training_row(s, 20, 5.0) for s in range(1, 21)], "loss")
    assert loss_panel["run_a eval/val/loss"] == ([5, 10, 15, 20], [4.0 - s / 10 for s in (5, 10, 15, 20)])
    assert loss_panel["run_a eval/web/loss"] == ([5, 10, 15, 20], [5.0 - s / 20 for s in (5, 10, 15, 20)])
    assert all(line.get_marker() not in (None, "None", "") for line in axes[0].get_lines()[1:])
    for ax in axes[1:]:  # the evaluation rows carry no lr or throughput: one training line each
        assert list(lines_of(ax)) == ["run_a"] and len(lines_of(ax)["run_a"][0]) == 20


def test_metrics_other_than_losses_get_one_eval_panel_and_null_losses_are_skipped(tmp_path, capsys):
    from minimind_scale.training.plot import draw

    online = with_evals(8, 4, online_eval)
    online[2]["loss"] = None  # a step with no loss to log
    lm = with_evals(6, 3, lm_eval)
    axes = draw([("online", online), ("lm", lm)]).axes
    assert [ax.get_ylabel() for ax in axes] == [*OLD_PANELS, "eval"]
    assert axes[-1].get_xlabel() == "optimizer step"
    loss_panel = lines_of(axes[0])
    assert list(loss_panel) == ["online", "lm", "lm eval/val/loss", "lm eval/web/loss"]
    assert loss_panel["online"][0] == [s for s in range(1, 9) if s != 3]
    assert lines_of(axes[-1]) == {"online eval/val/reward": ([4, 8], [0.04, 0.08]),
                                  "online eval/val/reward_accuracy": ([4, 8], [0.54, 0.58])}
    line_colours = {line.get_label(): line.get_color() for ax in axes for line in ax.get_lines()}
    assert line_colours["online eval/val/reward"] == line_colours["online"] != line_colours["lm"]

    paths = [write_rows(tmp_path / "online", online), write_rows(tmp_path / "lm", lm)]
    code, err = cli(["plot", "--out_dir", *map(str, paths), "--save", str(tmp_path / "both.png")], capsys)
    assert code == 0, err
    assert (tmp_path / "both.png").read_bytes()[:8] == PNG_MAGIC


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
