from __future__ import annotations

import pytest

from tracetune.config import Config, ConfigError, RewardWeights, load_config, preset_names, save_config


def test_defaults_are_the_recipe():
    config = load_config("default")
    assert config.rewards == RewardWeights(correctness=0.6, trace=0.25, confidence=0.15)
    assert (config.data.seed, config.data.max_tokens) == (42, 1400)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_builds(name):
    assert isinstance(load_config(name), Config)


def test_ablation_preset_drops_the_trace_term():
    assert load_config("no-trace-reward").rewards.trace == 0.0


def test_overrides_are_typed_and_checked():
    config = load_config("default", ["data.seed=7", "rewards.trace=0", "data.skip_invalid=true"])
    assert (config.data.seed, config.rewards.trace, config.data.skip_invalid) == (7, 0.0, True)
    for bad, message in [
        ("data.sed=7", "unknown field 'sed'"),
        ("data.seed=seven", "expected int"),
        ("rewards.trace=-1", ">= 0"),
        ("data.val_fraction=1.5", "val_fraction"),
        ("sft.loop_share=1.5", r"sft.loop_share must be in \[0, 1\]"),
        ("sft.conclusion_weight=0", "sft.conclusion_weight must be > 0"),
        ("seed", "section.field=value"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config("default", [bad])


def test_saved_config_reproduces_the_run(tmp_path):
    config = load_config("default", ["data.seed=3", "rewards.confidence=0"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(path)
    path.write_text("data:\n  nope: 1\n")
    with pytest.raises(ConfigError, match=r"broken.yaml.data: unknown field 'nope'"):
        load_config(path)


def test_reward_weights_parse():
    assert RewardWeights.parse("0.6,0,0.15") == RewardWeights(correctness=0.6, trace=0.0, confidence=0.15)
    for bad in ("0.6,0", "a,b,c", "0,0,0"):
        with pytest.raises(ConfigError):
            RewardWeights.parse(bad)
