"""Which checkpoint `resume auto` picks: only complete ones, the newest first."""
from __future__ import annotations

import json

import pytest

from minimind_scale.errors import UserError
from minimind_scale.training.checkpoint import STATE_FILE, complete_checkpoints, find_resume_checkpoint


def _ckpt(root, name, complete=True):
    d = root / "checkpoints" / name
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x")
    if complete:
        (d / STATE_FILE).write_text(json.dumps({"step": 1}))
    return d


def test_partial_and_temporary_checkpoints_are_never_chosen(tmp_path):
    _ckpt(tmp_path, "step_3")
    newest = _ckpt(tmp_path, "step_12")
    _ckpt(tmp_path, ".tmp-step_15")                 # a save that died before its rename
    _ckpt(tmp_path, "step_18", complete=False)      # a directory without its state file
    _ckpt(tmp_path, "step_x")                       # not a step directory
    assert find_resume_checkpoint("auto", tmp_path) == newest
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_3", "step_12"]  # numeric order


def test_resume_modes(tmp_path):
    assert find_resume_checkpoint("auto", tmp_path) is None
    assert find_resume_checkpoint("never", tmp_path) is None
    explicit = _ckpt(tmp_path, "step_2")
    assert find_resume_checkpoint(str(explicit), tmp_path) == explicit
    with pytest.raises(UserError, match="not a checkpoint"):
        find_resume_checkpoint(str(tmp_path / "nope"), tmp_path)
