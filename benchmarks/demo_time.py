"""The demo's wall time over several runs, each in a fresh output directory and a fresh data cache.

    python benchmarks/demo_time.py [--runs 3] [--out benchmarks/results/demo_time.json] [-- DEMO OPTIONS]

Runs `python -m minimind_scale demo` --runs times, one after the other, as a user would (a new
process each time, nothing cached from the run before), and records for each: the wall time from
start to exit, the time of each step the demo prints ("(pretrain took 61.2s)"), how many of the
demo's answers hold their expected word, and the 1-minute load average before and after (other work
on the machine slows every step; on 2 cores a second busy process can double a training step).
Prints the range over the runs and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(work: Path, demo_args: list[str]) -> dict:
    env = dict(os.environ, MINIMIND_SCALE_CACHE=str(work / "cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "minimind_scale", "demo", "--out_dir", str(work / "out"), *demo_args],
                          env=env, capture_output=True, text=True, cwd=work)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"demo exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    steps = {name: float(t) for name, t in re.findall(r"^\((\S+) took ([\d.]+)s\)$", proc.stdout, re.M)}
    right, total = map(int, re.search(r"^(\d+) of (\d+) answers hold", proc.stdout, re.M).groups())
    answers = re.findall(r"^assistant: (.*)$", proc.stdout, re.M)
    return {"wall_s": round(wall, 1), "steps_s": steps, "answers_right": right, "answers": total,
            "replies": answers, "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "demo_time.json"))
    ap.add_argument("demo_args", nargs="*", help="options passed to the demo (after --)")
    args = ap.parse_args()
    runs = []
    for k in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="demo_time-") as tmp:
            run = one_run(Path(tmp), args.demo_args)
        runs.append(run)
        print(f"run {k + 1}: {run['wall_s']} s, {run['answers_right']}/{run['answers']} answers right, "
              f"steps {run['steps_s']}, load {run['load_avg_1min']}", flush=True)
    walls = [r["wall_s"] for r in runs]
    print(f"demo wall time over {len(runs)} runs: {min(walls)}–{max(walls)} s; answers right: "
          + ", ".join(f"{r['answers_right']}/{r['answers']}" for r in runs))
    Path(args.out).write_text(json.dumps({"cpu_count": os.cpu_count(), "demo_args": args.demo_args, "runs": runs},
                                         indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
