"""The held-out sets a run is measured on: their names, their rows (encoded as given), and the checks on them.

`--val_size` holds out records of the training files as the set `val` (data/selection.py); each
`--eval_data_path [NAME=]FILE` adds a set. Every set is encoded with the stage's own encoder under its
`eval_overrides` (no SFT augmentations), unpacked, exactly as `eval` encodes a file, so the two measure
the same rows. All of this happens before the run writes anything, so a bad set stops it with nothing written.
"""
from __future__ import annotations

import re
from pathlib import Path

import datasets
import numpy as np

from minimind_scale.data.prepare import RECORD_ORIGINS, check_data_files, prepare_dataset
from minimind_scale.errors import UserError

VAL = "val"
# Written into best/ beside the weights: the metric, its mode, value and step, and that evaluation's results.
BEST_FILE = "best_metric.json"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def eval_set_files(cfg) -> list[tuple[str, str]]:
    """[(name, file)] of --eval_data_path, each `NAME=FILE` or `FILE` (named by its stem), names unique."""
    sets = []
    for item in cfg.eval_data_path:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).stem, item
        if not path:
            raise UserError(f"eval_data_path {item!r}: no file after '=' (write NAME=FILE)")
        if not _NAME.match(name):
            raise UserError(f"eval_data_path {item!r}: a set name may hold letters, digits, '_', '-' and '.' only "
                            "(write NAME=FILE to choose one)")
        sets.append((name, path))
    names = [n for n, _ in sets] + ([VAL] if cfg.val_size else [])
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise UserError(f"eval_data_path: more than one evaluation set is named {', '.join(clashes)} ('val' is "
                        "the --val_size split); name them with NAME=FILE")
    return sets


def eval_set_names(cfg) -> list[str]:
    return ([VAL] if cfg.val_size else []) + [name for name, _ in eval_set_files(cfg)]


def logged_eval_metrics(spec, cfg) -> list[str]:
    """Every `eval/<set>/<metric>` name the run will log."""
    return [f"eval/{name}/{metric}" for name in eval_set_names(cfg) for metric in spec.validation_metrics(cfg)]


def monitored_metric(spec, cfg) -> str | None:
    """What best/ and early stopping follow: --save_best_metric, else the first set's first metric
    (its loss, or an online stage's reward); None when neither is asked for."""
    if cfg.save_best_metric is None and cfg.early_stopping_patience is None:
        return None
    return cfg.save_best_metric or logged_eval_metrics(spec, cfg)[0]


def best_mode(cfg, metric: str) -> str:
    if cfg.save_best_mode != "auto":
        return cfg.save_best_mode
    return "min" if metric.endswith(("loss", "ppl", "kl")) else "max"


def check_held_out(spec, cfg) -> None:
    """Everything about the evaluation options that needs no data and no model."""
    for name, path in eval_set_files(cfg):
        try:
            check_data_files([path])
        except UserError as e:
            raise UserError(f"evaluation set '{name}' (--eval_data_path): {e}") from None
    if spec.evaluate is None and spec.loss_units is None and eval_set_names(cfg):
        raise UserError(f"stage '{spec.name}' declares no way to measure a held-out set (no evaluate, no "
                        "loss_units); drop --val_size and --eval_data_path")
    if cfg.save_best_metric is not None:
        logged = logged_eval_metrics(spec, cfg)
        if cfg.save_best_metric not in logged:
            raise UserError(f"save_best_metric {cfg.save_best_metric!r} is never logged by this run; it logs "
                            f"{', '.join(logged)}")


def eval_config(spec, cfg, data_path: list[str]):
    """The run's config as evaluation encodes and measures with it: the stage's eval_overrides, unpacked."""
    return cfg.model_copy(update={"data_path": data_path, "packing": False, **spec.eval_overrides})


def prepare_held_out(spec, cfg, tokenizer, unpacked: datasets.Dataset, unpacked_dir: Path, val_rows: np.ndarray,
                     is_local_main: bool, log) -> dict[str, datasets.Dataset]:
    """{set name: its rows}, `val` first (the rows `val_rows` of the training data, re-encoded as given
    where the stage's eval_overrides change the encoding), then each --eval_data_path set in order."""
    sets = {}
    if cfg.val_size:
        sets[VAL] = _val_rows(spec, cfg, tokenizer, unpacked, unpacked_dir, val_rows, is_local_main, log)
    for name, path in eval_set_files(cfg):
        try:
            sets[name], _, _ = prepare_dataset(spec, eval_config(spec, cfg, [path]), tokenizer,
                                               is_local_main=is_local_main, log=log)
        except UserError as e:
            raise UserError(f"evaluation set '{name}': {e}") from None
    return sets


def _encodes_as_trained(spec, cfg) -> bool:
    """Whether the eval overrides leave the stage's encoding as training has it (none of them is a data field
    whose value differs)."""
    return all(getattr(cfg, k) == v for k, v in spec.eval_overrides.items() if k in spec.data_fields)


def _val_rows(spec, cfg, tokenizer, unpacked, unpacked_dir: Path, val_rows: np.ndarray, is_local_main, log):
    if _encodes_as_trained(spec, cfg):
        return unpacked.select(val_rows)
    as_given, given_dir, _ = prepare_dataset(spec, eval_config(spec, cfg, cfg.data_path), tokenizer,
                                             is_local_main=is_local_main, log=log)
    wanted = {tuple(o) for o in np.load(unpacked_dir / RECORD_ORIGINS)[val_rows].tolist()}
    origins = np.load(given_dir / RECORD_ORIGINS).tolist()
    return as_given.select([i for i, o in enumerate(origins) if tuple(o) in wanted])


def write_held_out_records(unpacked_dir: Path, val_rows: np.ndarray, files: list[str], target: Path) -> None:
    """The raw jsonl lines of the `val` records, in data order, so `eval --data_path` can measure the same ones."""
    origins = np.load(unpacked_dir / RECORD_ORIGINS)[val_rows]
    wanted: dict[int, set[int]] = {}
    for k, line in origins.tolist():
        wanted.setdefault(k, set()).add(line)
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "wb") as out:
        for k, path in enumerate(files):
            lines = wanted.get(k, set())
            with open(path, "rb") as f:
                for number, raw in enumerate(f, start=1):
                    if number in lines:
                        out.write(raw if raw.endswith(b"\n") else raw + b"\n")
    tmp.replace(target)
