"""An option a stage does not honour is refused before anything is loaded, naming the stage and the option."""
from __future__ import annotations

import pytest

from conftest import DEMO, cli_in_process


@pytest.mark.parametrize("stage, option", [
    ("dpo", ["--cross_entropy", "chunked"]),
    ("distill", ["--cross_entropy", "liger"]),
    ("dpo", ["--packing", "true"]),
    ("reward", ["--cross_entropy", "chunked"]),
    ("grpo", ["--pad_to", "max_seq_len"]),
])
def test_unhonoured_option_is_refused(stage, option, tmp_path, capsys):
    extra = {"distill": ["--teacher", str(tmp_path)], "grpo": ["--reward_funcs", "minimind_format"]}.get(stage, [])
    (tmp_path / "config.json").write_text("{}")  # a model directory as far as the config check goes
    code, err = cli_in_process([stage, "--data_path", str(DEMO / "sft.jsonl"), "--out_dir", str(tmp_path / "out"),
                                *extra, *option], capsys)
    assert code == 2
    assert f"stage '{stage}'" in err and f"--{option[0][2:]} {option[1]}" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
