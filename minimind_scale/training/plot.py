"""plot: loss, learning rate and throughput of one or more runs (their metrics.jsonl) in one PNG."""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from minimind_scale.config import StrictConfig
from minimind_scale.errors import UserError

PANELS = (("loss", "loss"), ("lr", "learning rate"), ("tokens_per_sec", "tokens / s"))


class PlotConfig(StrictConfig):
    """Draw loss, learning rate and tokens/s against the optimizer step for each run directory
    (several runs are overlaid, labelled with their directory names)."""

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
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 9), sharex=True)
    labels = _labels([d for d, _ in runs])
    for (_, rows), label in zip(runs, labels):
        for ax, (key, _) in zip(axes, PANELS):
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), label=label, marker="." if len(points) < 30 else None)
    for ax, (_, title) in zip(axes, PANELS):
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
    axes[0].set_title(", ".join(labels))
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    save = Path(cfg.save) if cfg.save else Path(cfg.out_dir[0]) / "loss.png"
    save.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(save, dpi=100)
    plt.close(fig)
    print(save)
    return save


def _labels(dirs: list[Path]) -> list[str]:
    """Run directory names; when two share a name (a/run, b/run), the parent is added."""
    names = [d.resolve().name for d in dirs]
    return [f"{d.resolve().parent.name}/{n}" if names.count(n) > 1 else n for d, n in zip(dirs, names)]
