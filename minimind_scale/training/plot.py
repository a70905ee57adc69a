"""plot: loss, learning rate and throughput of one or more runs (their metrics.jsonl) in one PNG, with the
held-out evaluation curves beside them."""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from minimind_scale.config import StrictConfig
from minimind_scale.errors import UserError

PANELS = (("loss", "loss"), ("lr", "learning rate"), ("tokens_per_sec", "tokens / s"))
EVAL_PANEL_TITLE = "eval"
EVAL_PREFIX = "eval/"
# Evaluation series share their run's colour; markers tell a run's series in one panel apart.
EVAL_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
PANEL_HEIGHT = 3  # inches per panel


class PlotConfig(StrictConfig):
    """Draw loss, learning rate and tokens/s against the optimizer step for each run directory
    (several runs are overlaid, labelled with their directory names). Held-out evaluation losses are drawn
    in the loss panel; other evaluation metrics (accuracies, rewards) get one more panel."""

    out_dir: list[str] = Field(..., description="one or more run directories holding metrics.jsonl")
    save: str | None = Field(None, description="PNG path (default: loss.png in the first run directory)")


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found: is {run_dir} a run's out_dir?")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or "step" not in row:
            raise UserError(f"{path}:{n}: a metrics row needs a 'step' field")
        rows.append(row)
    if not rows:
        raise UserError(f"{path} has no rows yet")
    return rows


def run(cfg: PlotConfig) -> Path:
    runs = [(Path(d), read_rows(Path(d))) for d in cfg.out_dir]  # every input checked before drawing
    labels = _labels([d for d, _ in runs])
    fig = draw(list(zip(labels, [rows for _, rows in runs])))
    save = Path(cfg.save) if cfg.save else Path(cfg.out_dir[0]) / "loss.png"
    save.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(save, dpi=100)
    print(save)
    return save


def draw(runs: list[tuple[str, list[dict]]]):
    """The figure for (label, metrics rows) runs: the PANELS stacked over a shared step axis, plus an "eval"
    panel when some run logs an evaluation metric that is neither a loss nor a perplexity. Each run keeps one
    colour in every panel."""
    # A bare Figure draws without pyplot: no display backend and no global figure to close.
    from matplotlib.figure import Figure

    split = [eval_series_keys(rows) for _, rows in runs]
    with_eval_panel = any(others for _, others in split)
    titles = [title for _, title in PANELS] + ([EVAL_PANEL_TITLE] if with_eval_panel else [])
    fig = Figure(figsize=(8, PANEL_HEIGHT * len(titles)))
    axes = fig.subplots(len(titles), 1, sharex=True)
    for n, ((label, rows), (loss_keys, other_keys)) in enumerate(zip(runs, split)):
        colour = f"C{n}"
        for ax, (key, _) in zip(axes, PANELS):
            _plot_training(ax, rows, key, label, colour)
        _plot_eval(axes[0], rows, loss_keys, label, colour)
        if with_eval_panel:
            _plot_eval(axes[-1], rows, other_keys, label, colour)
    _decorate(axes, titles, [label for label, _ in runs])
    fig.tight_layout()
    return fig


def eval_series_keys(rows: list[dict]) -> tuple[list[str], list[str]]:
    """The run's evaluation keys in first-logged order, split into the held-out losses (eval/<set>/loss) and
    the metrics for the eval panel. Perplexities are left out: exp of the loss already drawn."""
    keys = dict.fromkeys(key for row in rows for key in row if key.startswith(EVAL_PREFIX))
    losses = [key for key in keys if _metric_of(key) == "loss"]
    others = [key for key in keys if _metric_of(key) not in ("loss", "ppl")]
    return losses, others


def _metric_of(key: str) -> str:
    """The metric of an eval/<set>/<metric> key (a set name may itself hold slashes)."""
    return key.rsplit("/", 1)[-1]


def _points(rows: list[dict], key: str) -> list[tuple]:
    """(step, value) of the rows where `key` holds a number; rows without it, or with null, are skipped."""
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]


def _plot_training(ax, rows: list[dict], key: str, label: str, colour: str) -> None:
    """One run's training curve of `key`, dotted at each point while there are few."""
    points = _points(rows, key)
    if points:
        ax.plot(*zip(*points), label=label, color=colour, marker="." if len(points) < 30 else None)


def _plot_eval(ax, rows: list[dict], keys: list[str], label: str, colour: str) -> None:
    """One run's evaluation series, dashed with a marker per series (evaluations are sparse points)."""
    for n, key in enumerate(keys):
        points = _points(rows, key)
        if points:
            ax.plot(*zip(*points), label=f"{label} {key}", color=colour, linestyle="--",
                    marker=EVAL_MARKERS[n % len(EVAL_MARKERS)])


def _decorate(axes, titles: list[str], labels: list[str]) -> None:
    """Panel names, grids, legends where something was drawn, the runs as title, the step as x axis."""
    for ax, title in zip(axes, titles):
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
    axes[0].set_title(", ".join(labels))
    axes[-1].set_xlabel("optimizer step")


def _labels(dirs: list[Path]) -> list[str]:
    """Run directory names; when two share a name (a/run, b/run), the parent is added."""
    names = [d.resolve().name for d in dirs]
    return [f"{d.resolve().parent.name}/{n}" if names.count(n) > 1 else n for d, n in zip(dirs, names)]
