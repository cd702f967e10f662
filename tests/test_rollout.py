"""A GRPO step as values: every engine's rollout as one StepRollout (temperature-1
log-probs whatever the sampling temperature), the step's facts, the composite
reward as the learner computes it, and the update's trimmed batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tunix.rl.rollout import base_rollout

from conftest import wrap
from tracetune import logprobs
from tracetune.config import LoraConfig, RewardWeights, load_config
from tracetune.grpo import Scored, StepFacts, train_batch
from tracetune.lora import apply_lora
from tracetune.models.registry import load_model
from tracetune.rewards import combine, make_composite_reward, reward_components
from tracetune.rollout import StepRollout, TracetuneRollout, TunixEngineRollout, left_padded

PAD = 0
RIGHT = wrap("4")  # "Step 1: 2 + 2 = 4. Therefore, the answer is 4." -> <answer>4</answer>
COLUMNS = {"reference": np.array(["4", "4"]), "token_texts": [[RIGHT], ["oops"]], "token_logprobs": [[-0.1], [-0.1]]}


def rollout_of(texts, reasons, tokens=None, prompt_width=8):
    tokens = tokens or [np.arange(3, 3 + len(t) % 7 + 1, dtype=np.int32) for t in texts]
    return StepRollout(prompts=["p"] * len(texts), prompt_tokens=np.zeros((len(texts), prompt_width), np.int32),
                       tokens=tokens, texts=list(texts), token_texts=[[t] for t in texts],
                       logprobs=[np.full(len(t), -0.1, np.float32) for t in tokens], finish_reasons=list(reasons),
                       finite=True, seconds=1.0)


# ------------------------------------------------------------- the reward


def test_the_learners_composite_applies_the_weights_once():
    components = reward_components(["p", "p"], [RIGHT, "oops"], RewardWeights(), **COLUMNS)
    values = combine(components, RewardWeights())
    c, t, k = (components[name][0] for name in ("correctness", "trace", "confidence"))
    assert c == 1.0 and values[0] == pytest.approx(0.6 * c + 0.25 * t + 0.15 * k)
    assert values[1] == 0.0  # no tags, no answer: every component is 0
    # the reward function Tunix holds computes the same numbers
    assert make_composite_reward(RewardWeights())(["p", "p"], [RIGHT, "oops"], **COLUMNS) == values


def test_the_no_trace_ablation_drops_exactly_the_trace_term():
    full = combine(reward_components(["p", "p"], [RIGHT, "oops"], RewardWeights(), **COLUMNS), RewardWeights())
    ablation = RewardWeights.parse("0.6,0,0.15")
    components = reward_components(["p", "p"], [RIGHT, "oops"], ablation, **COLUMNS)
    trace = components["trace"][0]
    assert trace > 0.5  # the rubric still scores it (and it is logged) ...
    assert combine(components, ablation)[0] == pytest.approx(full[0] - 0.25 * trace)  # ... but it no longer pays
    assert load_config("no-trace-reward").rewards == RewardWeights.parse("0.6,0,0.15")


def test_step_facts_record_means_spread_truncation_and_samples():
    # G = 2: group 1 is (1.0, 0.0), with spread; group 2 is (0.5, 0.5), none
    rollout = rollout_of(["a", "bb", "ccc", "dddd"], ["stop", "length", "eos", "length"])
    scored = Scored(rollout, {"reference": ["4", "4", "7", "7"]},
                    {"correctness": [1.0, 0.0, 0.5, 0.5], "trace": [0.0, 0.0, 1.0, 1.0]}, np.array([1.0, 0.0, 0.5, 0.5]))
    facts = StepFacts(scored, scored, (32, 64), 1234, {"rollout": 1.0, "reward": 0.1}, num_generations=2)
    record = facts.record()
    assert record["reward/composite"] == 0.5 and record["reward/correctness"] == 0.5 and record["reward/trace"] == 0.5
    assert record["zero_spread"] == 0.5  # one group of two has all rewards equal
    assert record["groups_with_spread"] == 0.5 and record["filter_rollouts"] == 0  # no filter: trained as sampled
    assert record["truncated"] == 0.5  # two completions hit the budget
    assert record["completion_length"] == np.mean(rollout.lengths)
    assert record["padded_widths"] == [[32, 64]] and record["rollout_seeds"] == [1234]
    assert record["groups"] == []  # no problem ids in this batch: nothing for the pass-rate curriculum
    with_ids = Scored(rollout, {"id": ["a", "a", "b", "b"]}, scored.components, scored.rewards)
    assert StepFacts(with_ids, with_ids, (32, 64), 1, {}, num_generations=2, spread_on="correctness").groups() == [("a", True), ("b", False)]
    samples = facts.samples()
    assert [s["finish_reason"] for s in samples] == ["stop", "length", "eos", "length"]
    assert samples[2] == {"prompt": "p", "completion": "ccc", "reward": 0.5, "reference": "7", "finish_reason": "eos",
                          "correctness": 0.5, "trace": 1.0}


def test_a_rollout_with_missing_rows_is_refused():
    with pytest.raises(ValueError, match="rollout of 2 prompts came back with"):
        StepRollout(prompts=["p", "q"], prompt_tokens=np.zeros((2, 4), np.int32), tokens=[np.zeros(1, np.int32)],
                    texts=["a"], token_texts=[["a"]], logprobs=[np.zeros(1)], finish_reasons=["stop"], finite=True, seconds=0.0)


# ---------------------------------------------------------- the update's batch


def test_train_batch_cuts_only_padding_columns():
    prompt = np.zeros((2, 40), np.int32)
    prompt[0, -5:], prompt[1, -9:] = 7, 8  # left-padded: the longest prompt is 9 tokens
    tokens = [np.full(3, 5, np.int32), np.full(11, 6, np.int32)]  # the longest completion is 11
    rollout = StepRollout(prompts=["a", "b"], prompt_tokens=prompt, tokens=tokens, texts=["x", "y"], token_texts=[["x"], ["y"]],
                          logprobs=[np.zeros(3), np.zeros(11)], finish_reasons=["eos", "eos"], finite=True, seconds=0.0)
    prompt_ids, completion_ids = train_batch(rollout, PAD, (40, 50), multiple=8)
    assert prompt_ids.shape == (2, 16) and completion_ids.shape == (2, 16)  # 9 -> 16, 11 -> 16
    np.testing.assert_array_equal(prompt_ids, prompt[:, -16:])
    assert int((prompt_ids != PAD).sum()) == 14 and int((completion_ids != PAD).sum()) == 14  # no real token lost
    np.testing.assert_array_equal(completion_ids[1, :11], tokens[1])
    # Tunix's own widths (the "full" path): the budget
    prompt_ids, completion_ids = train_batch(rollout, PAD, (40, 50), multiple=None)
    assert prompt_ids.shape == (2, 40) and completion_ids.shape == (2, 50)


# ------------------------------------------- temperature-1 log-probs, every engine


@pytest.fixture(scope="module")
def tiny():
    loaded = load_model("tiny")
    model = apply_lora(loaded.model, LoraConfig(rank=4, alpha=8.0), 0)
    state = nnx.state(model, nnx.LoRAParam)  # adapters that are not zero, so the rollout must fold them in
    nnx.update(model, jax.tree.map(lambda x: 0.1 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype), state))
    return loaded, model


def rollout_config(temperature: float) -> base_rollout.RolloutConfig:
    return base_rollout.RolloutConfig(max_tokens_to_generate=12, max_prompt_length=16, temperature=temperature, top_k=None,
                                      top_p=None, seed=3, return_logprobs=True)


def model_logprobs(model, rollout: StepRollout) -> list[np.ndarray]:
    """log p(token) at temperature 1 under ``model``, straight from its forward pass."""
    completions = rollout.completion_tokens(PAD, max(len(t) for t in rollout.tokens))
    values = np.asarray(logprobs.completion_logprobs(model, jnp.asarray(rollout.prompt_tokens), jnp.asarray(completions), PAD))
    return [values[row, : len(t)] for row, t in enumerate(rollout.tokens)]


class ScriptedEngine:
    """A Tunix engine that returns fixed completions with log-probs at its temperature."""

    def __init__(self, tokenizer, tokens, sampled):
        self.tokenizer, self.tokens, self.sampled = tokenizer, tokens, sampled

    def generate(self, prompts, config):
        return base_rollout.RolloutOutput(text=[self.tokenizer.decode(t) for t in self.tokens], logits=None, tokens=self.tokens,
                                          left_padded_prompt_tokens=left_padded(self.tokenizer, prompts, config.max_prompt_length),
                                          logprobs=self.sampled)


def test_a_tunix_engine_at_temperature_06_gives_temperature_1_logprobs(tiny):
    loaded, model = tiny
    tokens = [np.asarray(loaded.tokenizer.encode("2 + 2 = 4", add_bos=False), np.int32), np.asarray([7, 8, 9], np.int32)]
    sampled = [np.full(len(t), -0.5, np.float32) for t in tokens]  # log-probs of logits / 0.6, as Tunix reports them
    engine = TunixEngineRollout(ScriptedEngine(loaded.tokenizer, tokens, sampled), loaded.tokenizer, policy=lambda: model,
                                pad_multiple=8)
    rollout = engine.step_rollout(["Q: 1 + 3?", "Q: 2 + 2?"], rollout_config(0.6))
    expected = model_logprobs(model, rollout)
    for got, want in zip(rollout.logprobs, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(rollout.logprobs[0], sampled[0])
    assert ["".join(t) for t in rollout.token_texts] == rollout.texts
    assert rollout.finish_reasons == ["eos", "eos"] and rollout.finite
    # at temperature 1 the engine's own log-probs are already the right ones
    again = engine.step_rollout(["Q: 1 + 3?", "Q: 2 + 2?"], rollout_config(1.0))
    np.testing.assert_array_equal(again.logprobs[0], sampled[0])


def test_a_nan_rollout_is_not_finite(tiny):
    loaded, model = tiny
    tokens = [np.asarray([7, 8], np.int32)]
    engine = TunixEngineRollout(ScriptedEngine(loaded.tokenizer, tokens, [np.asarray([-0.1, np.nan], np.float32)]),
                                loaded.tokenizer, policy=lambda: model)
    assert not engine.step_rollout(["Q"], rollout_config(0.6)).finite


def test_tracetunes_engine_reports_temperature_1_logprobs_and_frees_its_weights(tiny):
    loaded, model = tiny
    engine = TracetuneRollout(rollout_actor=model, tokenizer=None, mesh=None, rollout_config=rollout_config(0.6),
                              tracetune_tokenizer=loaded.tokenizer, lora=LoraConfig(rank=4, alpha=8.0))
    assert engine._generator.params is None  # no decode-layout copy of the weights outside a rollout
    rollout = engine.step_rollout(["Q: 1 + 3?\nA:", "Q: 2 + 2?\nA:"] * 2, rollout_config(0.6))
    assert engine._generator.params is None
    assert len(set(map(tuple, map(list, rollout.tokens)))) > 1  # sampled, not greedy
    for got, want in zip(rollout.logprobs, model_logprobs(model, rollout)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # the folded LoRA and the decoder's own arithmetic
    assert set(rollout.finish_reasons) <= {"stop", "eos", "length"} and rollout.finite
    assert rollout.prompt_tokens.shape == (4, 16)


# ------------------------------------------------------------------ the update


def test_the_adapter_step_trains_as_tunixs_and_keeps_the_base_arrays(tiny):
    """lora.adapter_step: the same adapters after two steps as nnx.jit of the same
    step, while the frozen base stays the very arrays it was (no new copy per step)."""
    import optax

    from tracetune.lora import adapter_step

    loaded, _ = tiny
    prompt = np.asarray(left_padded(loaded.tokenizer, ["Q: 1 + 3?", "Q: 2 + 2?"], 16))
    completion = np.asarray([loaded.tokenizer.encode(" 4", add_bos=False) * 3] * 2, np.int32)

    def train_step(model, optimizer, inputs):
        def loss_fn(m):
            return -jnp.mean(logprobs.completion_logprobs(m, inputs["prompt"], inputs["completion"], PAD))

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    def fresh():
        model = apply_lora(load_model("tiny").model, LoraConfig(rank=4, alpha=8.0), 0)
        return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    inputs = {"prompt": jnp.asarray(prompt), "completion": jnp.asarray(completion)}
    ours, ours_opt = fresh()
    base_before = jax.tree.leaves(nnx.state(ours, nnx.Not(nnx.LoRAParam)))
    step = adapter_step(train_step, ours, ours_opt)
    theirs, theirs_opt = fresh()
    their_base_before = jax.tree.leaves(nnx.state(theirs, nnx.Not(nnx.LoRAParam)))
    tunix_step = nnx.jit(train_step)
    losses = [(float(step(inputs)), float(tunix_step(theirs, theirs_opt, inputs))) for _ in range(2)]
    assert losses[0][0] == pytest.approx(losses[0][1], rel=1e-6) and losses[1][0] < losses[0][0]  # it learns
    for a, b in zip(jax.tree.leaves(nnx.state(ours, nnx.LoRAParam)), jax.tree.leaves(nnx.state(theirs, nnx.LoRAParam))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    base_after = jax.tree.leaves(nnx.state(ours, nnx.Not(nnx.LoRAParam)))
    assert all(a is b for a, b in zip(base_before, base_after))  # the same arrays: nothing copied
    # nnx.jit of the whole model hands back new arrays for the frozen base: the copy this step avoids
    assert not any(a is b for a, b in zip(jax.tree.leaves(nnx.state(theirs, nnx.Not(nnx.LoRAParam))), their_base_before))
