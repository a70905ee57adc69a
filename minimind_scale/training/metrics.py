"""metrics.jsonl (main process only) and the optional experiment tracker, fed the same rows."""
from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, out_dir: Path, accelerator, resumed_step: int):
        self.accelerator = accelerator
        self.path = out_dir / "metrics.jsonl"
        self.enabled = accelerator.is_main_process
        if self.enabled and self.path.exists():
            # Rows logged after the checkpoint we resume from belong to a run that is being redone.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resumed_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
