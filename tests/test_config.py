"""Configs: presets load, overrides apply, and every mistake names the key and what it accepts."""
from __future__ import annotations

from pathlib import Path

import pytest

from vdistill.cli import main
from vdistill.config import ConfigError, load_config

PRESETS = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(PRESETS.glob("*.yaml"))


@pytest.mark.parametrize("preset", CONFIGS, ids=lambda p: p.name)
def test_every_preset_validates(preset):
    assert load_config(preset).run.name


def test_configs_demo_yaml_is_what_vdistill_demo_runs():
    """`vdistill demo` reads its preset from the installed package; configs/demo.yaml builds on it, so evaluating
    or re-running the demo's folder with configs/demo.yaml sees the demo's settings."""
    from vdistill.cli import _config, _parser

    demo = _config(_parser().parse_args(["demo"]))
    assert demo == load_config(PRESETS / "demo.yaml")
    assert (demo.demo.kind, demo.run.name, demo.evaluate.num_eval) == ("footage", "demo", 5)
    procedural = _config(_parser().parse_args(["demo", "--procedural", "dynamic.iterations=7"]))
    assert (procedural.demo.kind, procedural.run.name, procedural.dynamic.iterations) == (
        "procedural", "demo-procedural", 7)


def test_paper_presets_inherit_their_dataset_and_the_paper_settings():
    cfg = load_config(PRESETS / "miniucf_mtt_vpc1.yaml")
    assert (cfg.decode.frames, cfg.decode.size, cfg.decode.stride) == (16, 112, 4)
    assert (cfg.model.width, cfg.model.head, cfg.evaluate.epochs) == (128, "paper", 501)
    assert (cfg.dynamic.lr_dynamic, cfg.dynamic.syn_steps, cfg.dynamic.lr_teacher) == (1e4, 10, 0.01)


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config(None, ["decode.frames=16", "baselines.coresets=[random, kcenter]", "tracking.enabled=false"])
    assert cfg.decode.frames == 16 and cfg.baselines.coresets == ["random", "kcenter"] and not cfg.tracking.enabled


def test_unknown_key_is_named_with_the_allowed_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'decode.fps'; allowed here: frames, interpolation"):
        load_config(None, ["decode.fps=3"])


def test_wrong_choice_lists_the_allowed_values():
    with pytest.raises(ConfigError, match=r"decode.resize: must be one of 'squash' or 'short_side_crop'"):
        load_config(None, ["decode.resize=crop"])


def test_out_of_range_value_names_the_key_and_the_bound():
    with pytest.raises(ConfigError, match=r"cache.max_quarantine_fraction: .*less than or equal to 1"):
        load_config(None, ["cache.max_quarantine_fraction=2"])


def test_experts_shorter_than_what_mtt_reads_are_rejected():
    with pytest.raises(ConfigError, match="experts.epochs=3 is shorter than"):
        load_config(None, ["experts.epochs=3"])


def test_extra_s2d_method_overrides_take_only_dynamic_keys():
    cfg = load_config(None, ["baselines.s2d_overrides={dm: {lr_dynamic: 0.5}}"])
    assert cfg.dynamic_for("dm").lr_dynamic == 0.5 and cfg.dynamic_for("mtt").lr_dynamic == cfg.dynamic.lr_dynamic
    with pytest.raises(ConfigError, match=r"s2d_overrides.dm has unknown key\(s\) \['vpc'\]"):
        load_config(None, ["baselines.s2d_overrides={dm: {vpc: 5}}"])


def test_missing_preset_says_where_presets_live():
    with pytest.raises(ConfigError, match="presets live in configs/"):
        load_config("configs/nope.yaml")


def test_cli_reports_a_bad_config_and_exits_2(capsys):
    assert main(["ingest", str(PRESETS / "demo.yaml"), "decode.frames=0"]) == 2
    assert "decode.frames" in capsys.readouterr().err


def test_public_config_never_contains_credentials():
    cfg = load_config(None, ["storage.access_key=AKIA123", "storage.secret_key=s3cr3t"])
    assert "s3cr3t" not in str(cfg.public_dict()) and "AKIA123" not in str(cfg.public_dict())


def test_cli_takes_overrides_after_options_too(capsys):
    assert main(["evaluate", str(PRESETS / "demo.yaml"), "--full", "decode.frames=0"]) == 2
    assert "decode.frames" in capsys.readouterr().err


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("decode:\n  frames: 8\n  size: [32\nrun:\n  name: x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:4:\d+: YAML syntax error: "):
        load_config(preset)


def test_cli_prints_a_yaml_syntax_error_as_one_line_and_exits_2(tmp_path, capsys):
    preset = tmp_path / "bad.yaml"
    preset.write_text("run:\n\tname: x\n")
    assert main(["ingest", str(preset)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vdistill: {preset}:2:1: YAML syntax error") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_override_that_is_not_yaml_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'baselines.coresets=\[random': the value is not valid YAML"):
        load_config(None, ["baselines.coresets=[random"])
