"""A stage written outside the package is found, listed and trained exactly like the built-ins."""
from __future__ import annotations

import json
import re

from conftest import REPO, read_metrics, run_cli

EXAMPLE = REPO / "examples" / "completion_stage.py"


def test_readme_shows_the_tested_example():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    body = EXAMPLE.read_text().split('"""', 2)[2].strip()
    assert any(b.strip() == body for b in blocks), "README's plugin example differs from examples/completion_stage.py"


def test_plugin_is_listed_and_trains(tmp_path, data_cache):
    data = tmp_path / "pairs.jsonl"
    with open(data, "w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"{i} plus 1 is", "completion": f"{i + 1}."}) + "\n")
    top = run_cli(["--plugin", str(EXAMPLE), "--help"], data_cache).stdout
    assert re.search(r"^\s+completion\s+prompt -> completion", top, flags=re.M)
    help_text = run_cli(["--plugin", str(EXAMPLE), "completion", "--help"], data_cache).stdout
    assert "--separator" in help_text and "--learning_rate" in help_text

    out = tmp_path / "run"
    run_cli(["--plugin", str(EXAMPLE), "completion", "--model", "tiny", "--data_path", str(data), "--out_dir", str(out),
             "--max_steps", "6", "--batch_size", "8", "--max_seq_len", "32", "--learning_rate", "3e-3",
             "--log_interval", "1", "--dtype", "fp32", "--num_proc", "1"], data_cache)
    rows = read_metrics(out)
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]
    # Only completion tokens carry loss: "N." plus eos is 2-4 tokens per record, far fewer than the row.
    assert rows[0]["tokens"] <= 8 * 4
    assert (out / "final" / "model.safetensors").is_file()


def test_plugin_from_environment_variable(tmp_path, data_cache):
    top = run_cli(["--help"], data_cache, MINIMIND_SCALE_PLUGINS=str(EXAMPLE)).stdout
    assert "completion" in top


def test_broken_plugin_is_a_user_error(tmp_path, data_cache):
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    proc = run_cli(["--plugin", str(bad), "--help"], data_cache, check=False)
    assert proc.returncode == 2 and "bad.py" in proc.stderr and "Traceback" not in proc.stderr
