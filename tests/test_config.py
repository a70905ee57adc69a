"""Unit tests of minimind_scale.config: flag parsing, YAML + flag merging, validation messages, help, round trip."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from minimind_scale.config import (
    StrictConfig,
    TrainConfig,
    build_config,
    describe_fields,
    did_you_mean,
    load_yaml,
    parse_flags,
    save_config,
)
from minimind_scale.errors import UserError


class StageLikeConfig(TrainConfig):
    """A stage's config: changes a default and adds a field, as the real stages do."""

    batch_size: int = Field(16, ge=1, description="rows per micro-batch")
    beta: float = Field(0.1, gt=0, description="a stage's own field")


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def user_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as exc:
        fn(*args, **kwargs)
    return str(exc.value)


# --------------------------------------------------------------------------- parse_flags


class TestParseFlags:
    def test_space_and_equals_forms(self):
        flags = parse_flags(["--learning_rate", "1e-3", "--batch_size=4"], TrainConfig)
        assert flags == {"learning_rate": "1e-3", "batch_size": "4"}

    def test_dashes_and_underscores_are_alike(self):
        flags = parse_flags(["--learning-rate", "2e-4", "--max-seq-len=128", "--min_lr_ratio", "0"], TrainConfig)
        assert flags == {"learning_rate": "2e-4", "max_seq_len": "128", "min_lr_ratio": "0"}

    def test_list_field_takes_several_values(self):
        flags = parse_flags(["--data_path", "a.jsonl", "b.jsonl", "c.jsonl", "--epochs", "3"], TrainConfig)
        assert flags == {"data_path": ["a.jsonl", "b.jsonl", "c.jsonl"], "epochs": "3"}

    def test_list_field_with_one_value_and_equals_form(self):
        assert parse_flags(["--data_path", "a.jsonl"], TrainConfig) == {"data_path": ["a.jsonl"]}
        assert parse_flags(["--data-path=a.jsonl"], TrainConfig) == {"data_path": ["a.jsonl"]}

    def test_bare_boolean_flag_means_true(self):
        flags = parse_flags(["--packing", "--skip_bad_records", "--epochs", "2", "--compile"], TrainConfig)
        assert flags == {"packing": "true", "skip_bad_records": "true", "epochs": "2", "compile": "true"}
        cfg = build_config(TrainConfig, flags)
        assert cfg.packing is True and cfg.skip_bad_records is True and cfg.compile is True

    def test_boolean_flag_with_explicit_value(self):
        cfg = build_config(TrainConfig, parse_flags(["--packing", "false", "--compile=true"], TrainConfig))
        assert cfg.packing is False and cfg.compile is True

    def test_negative_number_is_a_value_not_a_flag(self):
        assert parse_flags(["--seed", "-5"], TrainConfig) == {"seed": "-5"}

    @pytest.mark.parametrize("argv", [["--learning_rate"], ["--learning_rate", "--epochs", "2"], ["--out_dir"]])
    def test_missing_value_errors(self, argv):
        msg = user_error(parse_flags, argv, TrainConfig)
        assert argv[0] in msg and "value" in msg

    def test_list_field_without_values_errors(self):
        msg = user_error(parse_flags, ["--data_path", "--epochs", "1"], TrainConfig)
        assert "--data_path" in msg

    def test_two_values_for_a_scalar_field_errors(self):
        msg = user_error(parse_flags, ["--learning_rate", "1e-3", "2e-3"], TrainConfig)
        assert "--learning_rate" in msg and "1e-3 2e-3" in msg

    @pytest.mark.parametrize("tok", ["positional", "-x", "--"])
    def test_argument_that_is_not_an_option_errors(self, tok):
        msg = user_error(parse_flags, [tok], TrainConfig)
        assert repr(tok) in msg

    def test_value_may_contain_equals_sign(self):
        assert parse_flags(["--out_dir=a=b"], TrainConfig) == {"out_dir": "a=b"}

    def test_unknown_bare_flag_is_reported_as_unknown_field(self):
        # `--pakcing` (a typo of the boolean --packing) must get a did-you-mean, not "needs a value".
        msg = user_error(build_config, TrainConfig, parse_flags(["--pakcing"], TrainConfig))
        assert "pakcing" in msg and "did you mean 'packing'" in msg


# --------------------------------------------------------------------------- build_config


class TestBuildConfig:
    def test_defaults(self):
        cfg = build_config(TrainConfig, {})
        assert cfg == TrainConfig()
        assert cfg.learning_rate == 5e-4 and cfg.data_path == []

    def test_stage_class_defaults_apply(self):
        cfg = build_config(StageLikeConfig, {})
        assert cfg.batch_size == 16 and cfg.beta == 0.1

    def test_precedence_defaults_yaml_flags(self, tmp_path):
        y = write(tmp_path / "run.yaml", """
            learning_rate: 0.001
            batch_size: 4
            out_dir: from_yaml
        """)
        cfg = build_config(StageLikeConfig, {"batch_size": "2"}, str(y))
        assert cfg.batch_size == 2            # flag beats YAML
        assert cfg.learning_rate == 1e-3      # YAML beats default
        assert cfg.out_dir == "from_yaml"
        assert cfg.epochs == 1                # default where neither says
        assert cfg.beta == 0.1

    def test_flag_string_becomes_list_and_yaml_scalar_becomes_list(self, tmp_path):
        y = write(tmp_path / "run.yaml", "data_path: one.jsonl\n")
        assert build_config(TrainConfig, {}, str(y)).data_path == ["one.jsonl"]
        assert build_config(TrainConfig, {"data_path": "two.jsonl"}, str(y)).data_path == ["two.jsonl"]
        assert build_config(TrainConfig, {"data_path": ["a", "b"]}, str(y)).data_path == ["a", "b"]

    def test_types_coerced_from_strings(self):
        cfg = build_config(TrainConfig, {
            "learning_rate": "1e-3", "batch_size": "4", "packing": "true", "compile": "False",
            "max_steps": "10", "dtype": "bf16", "min_lr_ratio": "0",
        })
        assert cfg.learning_rate == pytest.approx(1e-3) and isinstance(cfg.learning_rate, float)
        assert cfg.batch_size == 4 and isinstance(cfg.batch_size, int)
        assert cfg.packing is True and cfg.compile is False
        assert cfg.max_steps == 10 and cfg.dtype == "bf16" and cfg.min_lr_ratio == 0.0

    def test_yaml_exponent_without_dot_is_a_float(self, tmp_path):
        # YAML 1.1 reads `1e-3` as a string; it must still become the float 0.001.
        y = write(tmp_path / "run.yaml", "learning_rate: 1e-3\n")
        assert build_config(TrainConfig, {}, str(y)).learning_rate == pytest.approx(1e-3)

    def test_optional_field_can_be_unset_from_the_command_line(self, tmp_path):
        y = write(tmp_path / "run.yaml", "max_steps: 100\n")
        assert build_config(TrainConfig, {}, str(y)).max_steps == 100
        assert build_config(TrainConfig, {"max_steps": "none"}, str(y)).max_steps is None

    def test_unknown_field_did_you_mean(self):
        msg = user_error(build_config, TrainConfig, {"learning_rat": "1e-3"})
        assert "learning_rat" in msg and "did you mean 'learning_rate'" in msg
        assert "command line" in msg

    def test_unknown_field_without_close_match(self):
        msg = user_error(build_config, TrainConfig, {"zzzzzz": "1"})
        assert "unknown field 'zzzzzz'" in msg and "did you mean" not in msg

    def test_stage_field_is_known_only_to_its_stage(self):
        assert build_config(StageLikeConfig, {"beta": "0.5"}).beta == 0.5
        msg = user_error(build_config, TrainConfig, {"beta": "0.5"})
        assert "unknown field 'beta'" in msg

    def test_several_problems_reported_at_once(self, tmp_path):
        y = write(tmp_path / "run.yaml", """
            epochs: 1
            batch_sise: 4
            dtype: fp64
        """)
        flags = {"learning_rat": "1e-3", "batch_size": "abc", "learning_rate": "0", "warmup_steps": "-1"}
        msg = user_error(build_config, TrainConfig, flags, str(y))
        lines = msg.splitlines()
        assert len(lines) == 6, msg
        assert any(f"{y}:2" in ln and "batch_sise" in ln and "did you mean 'batch_size'" in ln for ln in lines)
        assert any(f"{y}:3" in ln and "'dtype'" in ln for ln in lines)
        assert any("learning_rat'" in ln and "did you mean 'learning_rate'" in ln for ln in lines)
        assert any("'batch_size'" in ln and "abc" in ln for ln in lines)
        assert any("'learning_rate'" in ln and "greater than 0" in ln for ln in lines)
        assert any("'warmup_steps'" in ln for ln in lines)

    def test_yaml_unknown_key_names_file_and_line(self, tmp_path):
        y = write(tmp_path / "run.yaml", """
            # a comment
            learning_rate: 0.001

            lerning_rate: 0.002
        """)
        msg = user_error(build_config, TrainConfig, {}, str(y))
        assert f"{y}:4" in msg and "lerning_rate" in msg and "did you mean 'learning_rate'" in msg

    def test_yaml_bad_value_names_file_and_line_of_key(self, tmp_path):
        y = write(tmp_path / "run.yaml", """
            epochs: 2
            out_dir: somewhere
            batch_size: many
        """)
        msg = user_error(build_config, TrainConfig, {}, str(y))
        assert f"{y}:3" in msg and "batch_size" in msg and "many" in msg

    def test_flag_overriding_bad_yaml_value_is_fine(self, tmp_path):
        y = write(tmp_path / "run.yaml", "batch_size: many\n")
        assert build_config(TrainConfig, {"batch_size": "3"}, str(y)).batch_size == 3

    def test_invalid_yaml_names_file_and_line(self, tmp_path):
        y = write(tmp_path / "run.yaml", "epochs: 1\ndata_path: [a.jsonl\nout_dir: x\n")
        msg = user_error(build_config, TrainConfig, {}, str(y))
        assert str(y) in msg and "not valid YAML" in msg
        assert f"{y}:3" in msg

    def test_yaml_that_is_not_a_mapping(self, tmp_path):
        y = write(tmp_path / "run.yaml", "- a\n- b\n")
        msg = user_error(build_config, TrainConfig, {}, str(y))
        assert str(y) in msg and "mapping" in msg

    def test_empty_yaml_means_defaults(self, tmp_path):
        y = write(tmp_path / "run.yaml", "# nothing here\n")
        assert build_config(TrainConfig, {}, str(y)) == TrainConfig()

    def test_missing_config_file(self, tmp_path):
        msg = user_error(build_config, TrainConfig, {}, str(tmp_path / "nope.yaml"))
        assert "nope.yaml" in msg and "not found" in msg

    def test_config_path_is_a_directory(self, tmp_path):
        msg = user_error(build_config, TrainConfig, {}, str(tmp_path))
        assert str(tmp_path) in msg

    def test_config_file_not_utf8(self, tmp_path):
        y = tmp_path / "run.yaml"
        y.write_bytes(b"out_dir: caf\xe9\n")
        msg = user_error(build_config, TrainConfig, {}, str(y))
        assert str(y) in msg and "UTF-8" in msg

    def test_load_yaml(self, tmp_path):
        y = write(tmp_path / "run.yaml", "a: 1\nb: [x, y]\n")
        assert load_yaml(str(y)) == {"a": 1, "b": ["x", "y"]}

    @pytest.mark.parametrize("field,value", [
        ("learning_rate", "0"), ("learning_rate", "-1"), ("batch_size", "0"), ("epochs", "0"),
        ("max_seq_len", "4"), ("min_lr_ratio", "1.5"), ("adam_beta2", "1"), ("grad_clip", "-0.1"),
        ("max_steps", "0"), ("accumulation_steps", "0"), ("save_total_limit", "0"), ("hidden_size", "4"),
    ])
    def test_out_of_range_rejected(self, field, value):
        msg = user_error(build_config, TrainConfig, {field: value})
        assert f"'{field}'" in msg and repr(value) in msg

    @pytest.mark.parametrize("field,value", [
        ("batch_size", "abc"), ("learning_rate", "fast"), ("packing", "maybe"), ("dtype", "fp64"),
        ("report_to", "mlflow"), ("batch_size", "2.5"),
    ])
    def test_wrong_type_rejected(self, field, value):
        msg = user_error(build_config, TrainConfig, {field: value})
        assert f"'{field}'" in msg and value in msg

    def test_message_has_no_pydantic_url_noise(self):
        msg = user_error(build_config, TrainConfig, {"batch_size": "abc"})
        assert "errors.pydantic.dev" not in msg and "Traceback" not in msg


# --------------------------------------------------------------------------- help, save, round trip


def test_did_you_mean():
    assert did_you_mean("learning_rat", TrainConfig.model_fields) == " (did you mean 'learning_rate'?)"
    assert did_you_mean("qqqqq", TrainConfig.model_fields) == ""


def test_describe_fields_lists_every_field_with_default():
    text = describe_fields(StageLikeConfig)
    lines = text.splitlines()
    assert len(lines) == len(StageLikeConfig.model_fields)
    for name, field in StageLikeConfig.model_fields.items():
        line = next((ln for ln in lines if ln.split()[0] == f"--{name}"), None)
        assert line is not None, f"--{name} missing from the help"
        default = field.default_factory() if field.default_factory is not None else field.default
        assert f"default {default!r}" in line, line
        if field.description:
            assert field.description in line
    # the stage's changed default, not the base class's
    assert "default 16" in next(ln for ln in lines if ln.split()[0] == "--batch_size")
    assert "auto|bf16|fp16|fp32" in next(ln for ln in lines if ln.split()[0] == "--dtype")


def test_describe_fields_of_a_small_config():
    class Tool(StrictConfig):
        mode: Literal["a", "b"] = Field("a", description="which mode")
        count: int | None = Field(None, description="how many")

    text = describe_fields(Tool)
    assert "--mode" in text and "a|b" in text and "which mode" in text
    assert "--count" in text and "default None" in text


def test_save_config_round_trip(tmp_path):
    flags = parse_flags([
        "--data_path", "a.jsonl", "b.jsonl", "--learning_rate", "3e-5", "--packing", "--max_steps", "7",
        "--dtype", "fp32", "--out_dir", "runs/x y", "--tokenizer", "tok", "--beta", "0.25",
        "--resume", "never", "--weight_decay", "0.1", "--min_lr_ratio", "1e-2",
    ], StageLikeConfig)
    cfg = build_config(StageLikeConfig, flags)
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    again = build_config(StageLikeConfig, parse_flags([], StageLikeConfig), str(path))
    assert again == cfg
    assert again.model_dump() == cfg.model_dump()
    # and once more, through the file the reloaded config writes
    save_config(again, tmp_path / "config2.yaml")
    assert (tmp_path / "config2.yaml").read_text() == path.read_text()


def test_saved_config_reruns_with_overrides(tmp_path):
    cfg = build_config(TrainConfig, {"learning_rate": "1e-5", "epochs": "3"})
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    again = build_config(TrainConfig, {"epochs": "1"}, str(path))
    assert again.learning_rate == 1e-5 and again.epochs == 1


def test_validate_assignment():
    cfg = TrainConfig()
    with pytest.raises(Exception):  # noqa: B017
        cfg.batch_size = 0
    cfg.plugin = ["x.py"]
    assert cfg.plugin == ["x.py"]
