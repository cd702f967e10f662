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
        ("grpo.rows_per_pass=3", r"grpo.rows_per_pass must divide the \d+ completions of a micro-batch"),
        ("grpo.row_gradients=sum", "grpo.row_gradients must be one of recompute, accumulate"),
        ("grpo.row_gradients=accumulate", "set grpo.rows_per_pass >= 1"),
        ("grpo.prompt_width=9999", r"grpo.prompt_width must be 0 \(off\) or at most grpo.max_prompt_tokens"),
        ("seed", "section.field=value"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config("default", [bad])
    with pytest.raises(ConfigError, match="grpo.rows_per_pass needs grpo.logprobs=chunked"):
        load_config("default", ["grpo.rows_per_pass=1", "grpo.logprobs=full"])
    with pytest.raises(ConfigError, match="grpo.prompt_width needs grpo.logprobs=chunked"):
        load_config("cpu-demo", ["grpo.logprobs=full", "grpo.rows_per_pass=0", "grpo.row_gradients=recompute"])


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


def test_the_default_weights_are_exactly_the_recipe():
    assert RewardWeights().as_dict() == {"correctness": 0.6, "trace": 0.25, "confidence": 0.15, "arithmetic": 0.0, "judge": 0.0,
                                         "sound": 0.0, "progress": 0.0}
    weights = RewardWeights()
    assert (weights.correctness, weights.trace, weights.confidence, weights.arithmetic) == (0.6, 0.25, 0.15, 0.0)
    assert str(weights) == "0.6 correctness + 0.25 trace + 0.15 confidence"  # the formula logs print


# (--reward-weights text, the weights it gives), one form per line.
PARSE_CASES = [
    ("correctness=0.6,trace=0.25,confidence=0.15,arithmetic=0", RewardWeights()),  # every name
    ("0.6,0.25,0.15", RewardWeights()),  # the recipe's positional form
    ("0.6,0.25,0.15,0.2", RewardWeights(arithmetic=0.2)),  # positional, in registry order
    ("arithmetic=1", RewardWeights(correctness=0, trace=0, confidence=0, arithmetic=1)),  # a name not given weighs 0
    (" trace = 0.5 , correctness=0.5 ", RewardWeights(correctness=0.5, trace=0.5, confidence=0)),  # any order, spaces
]


@pytest.mark.parametrize("text,weights", PARSE_CASES)
def test_reward_weights_by_name_or_position(text, weights):
    assert RewardWeights.parse(text) == weights


@pytest.mark.parametrize("text,message", [
    ("correctness=0.6,speed=1", r"unknown reward 'speed'.*known: correctness, trace, confidence, arithmetic, judge, sound, progress"),  # a typo names the known
    ("trace=1,trace=2", "twice"),  # a name twice
    ("trace=lots", "name=number"),  # not a number
    ("0.6,trace=0.25", "name=number pairs"),  # mixed forms
    ("1,2,3,4,5,6,7,8", "3 to 7 numbers"),  # more numbers than components
    ("arithmetic=0", "not all 0"),  # nothing weighted
    ("trace=-1", ">= 0"),
])
def test_bad_reward_weights_say_why(text, message):
    with pytest.raises(ConfigError, match=message):
        RewardWeights.parse(text)


def test_reward_weights_in_presets_overrides_and_saved_configs(tmp_path):
    assert load_config("default", ["rewards.arithmetic=0.2"]).rewards == RewardWeights(arithmetic=0.2)
    path = tmp_path / "preset.yaml"
    path.write_text("rewards:\n  correctness: 0.6\n  trace: 0.25\n  confidence: 0.15\n")  # a preset without arithmetic
    assert load_config(path).rewards == RewardWeights()
    with pytest.raises(ConfigError, match=r"rewards: unknown reward 'speed' \(known: correctness, trace, confidence, arithmetic, judge, sound, progress\)"):
        load_config("default", ["rewards.speed=1"])
    with pytest.raises(ConfigError, match="rewards.arithmetic: expected float"):
        load_config("default", ["rewards.arithmetic=much"])
    config = load_config("default", ["rewards.arithmetic=0.2", "rewards.trace=0"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert "arithmetic: 0.2" in (tmp_path / "config.yaml").read_text()  # a saved run states every weight


def test_reward_weights_are_immutable_values():
    import copy
    import pickle

    weights = RewardWeights(arithmetic=0.2)
    assert copy.deepcopy(weights) == pickle.loads(pickle.dumps(weights)) == weights
    assert hash(weights) == hash(RewardWeights(arithmetic=0.2)) and weights != RewardWeights()
    with pytest.raises(AttributeError):
        weights.trace = 1.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        weights.speed  # noqa: B018
    weights.as_dict()["trace"] = 9.0  # a copy
    assert weights.trace == 0.25
